# Config validation, the scan tables, and every helper the rules use.
import functools
import json
import re
import shlex
import sys

from medtx.config import validate_config
from medtx.data.scans import (
    IMAGES,
    build_scan_tables,
    planned_scan_tables,
    stamp_scan_table,
    table_text,
    write_scan_table,
)
from medtx.domain import BACKBONE_INITS, INITS, PRETRAIN_STAGES, TASKS
from medtx.train.config import STAGE_BLOCKS, stage_keys
from medtx.preprocess.backend import resolve_backend
from medtx.bundle import check_predict_plan, encoder_bundles, ensemble_bundles
from medtx.preprocess.chain import chain_params
from medtx.workflow import paths
from medtx.workflow.codehash import code_hash
from medtx.workflow.config_files import use_config_in_effect
from medtx.workflow.hooks import (
    plan_with_fewer_gc_passes,
    restore_gc,
    take_results_lock,
    use_checkout,
    user_errors,
)
from medtx.workflow.inputs import model_input_settings, output_settings, settings_hash
from medtx.workflow.lock import ResultsLock
from medtx.workflow.paths import brats_outputs, step_records, t1_outputs
from medtx.train.resources import launcher, training_resources, training_threads

# Rarer GC passes while the DAG is built (12 % of a 2,000-subject dry run);
# onstart restores the defaults before the first job. Jobs Snakemake spawns
# (a SLURM group job's inner run) skip hooks and keep them: a small plan, briefly.
plan_with_fewer_gc_passes()
with user_errors():
    # a --configfile that names its datasets replaces the demo's config.yaml whole
    print(
        use_config_in_effect(
            config,
            workflow.overwrite_configfiles,
            workflow.config_settings.overwrite_config,
            workflow.configfiles,
        ),
        file=sys.stderr,
    )
    validate_config(config)

RESULTS = config["results"]
LOGS = "logs"
BACKEND = resolve_backend(config["preprocess"]["backend"])
PRE = config["preprocess"]
ENV = "../../envs/medtx.yaml"
# Rules run `python -m medtx` from this checkout, whichever Python env runs the
# job (the project's .venv, or a conda env built from envs/medtx.yaml).
use_checkout(workflow.basedir)


# One run at a time per results folder, whatever its working directory (-d):
# taken just before the first job, given back when the run ends. Dry runs and
# the jobs Snakemake spawns (--no-hooks) call none of these. Nothing is written
# into the results folder before it is taken: every file there is a job's output,
# and the scan tables (rule scan_table, data.smk) are also written here, after it.
RESULTS_LOCK = ResultsLock(RESULTS)


onstart:
    restore_gc()
    take_results_lock(RESULTS_LOCK)
    # as the scan_table jobs would: --touch runs none, and touches their outputs
    for name, text in SCAN_TEXT.items():
        write_scan_table(text, paths.scan_table(RESULTS, name))


onsuccess:
    RESULTS_LOCK.release()


onerror:
    RESULTS_LOCK.release()


# One table per dataset, built (and checked) once per run from a per-file cache.
# A bad dataset stops the run before any job: its problems, one line each, as
# `medtx: error: ...` (as the medtx command prints them), without Snakemake's traceback.
# Read here; written only under the lock, by onstart and the scan_table jobs
# (data.smk), never in a dry run. Each job's input is a stamp in the working
# directory that is newer than its table exactly when the table does not hold this content.
# A job Snakemake spawned on the cluster (remote mode) reads the written tables
# instead of checking every image again.
with user_errors():
    SCANS = (planned_scan_tables if workflow.remote_exec else build_scan_tables)(
        config["datasets"],
        table_path=lambda name: paths.scan_table(RESULTS, name),
        on_bad_scan=config["on_bad_scan"],
        label_map=config["folds"]["label_map"],
        write=False,
    )
SCAN_TEXT = {name: table_text(table) for name, table in SCANS.items()}
SCAN_STAMPS = {
    name: stamp_scan_table(
        paths.scan_table(RESULTS, name),
        text,
        f".snakemake/medtx/scan_tables/{name}.stamp",
    )
    for name, text in SCAN_TEXT.items()
}
OK = {name: t[t["status"] == "ok"] for name, t in SCANS.items()}
# (dataset, scan) -> its image paths, so input functions look them up in O(1).
ROWS = {
    (name, row["scan"]): row
    for name, table in OK.items()
    for row in table[["scan", *(m for m in IMAGES if m in table)]].to_dict("records")
}

# File names, as patterns with {dataset} and {scan}.
T1 = t1_outputs(paths.preprocess_dir(RESULTS, "{dataset}", "{scan}"), "{scan}")
BRATS = brats_outputs(paths.preprocess_dir(RESULTS, "{dataset}", "{scan}"), "{scan}")
DEFACED = paths.defaced(RESULTS, "{dataset}", "{scan}")


# Snakemake's report (`snakemake --report report.zip`): each scan's QC strip, by
# dataset; the cohort report; the evaluation's tables and figures. Caption paths
# are relative to the rule files (workflow/rules/).
CAPTIONS = "../report"
QC_STRIP = dict(
    caption=f"{CAPTIONS}/qc_strip.rst",
    category="Preprocessing QC",
    subcategory="{dataset}",
    labels={"dataset": "{dataset}", "scan": "{scan}"},
)


def as_json(obj):
    """Params as compact, key-sorted JSON: stable strings for the params trigger."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def is_brats(dataset):
    return config["datasets"][dataset]["kind"] == "brats"


def bids_root(dataset):
    """A BIDS dataset's root (its images' Sources), else "" (a CSV-listed dataset)."""
    ds = config["datasets"][dataset]
    return ds["path"] if ds["kind"] == "bids" else ""


def t1_datasets():
    return [n for n in config["datasets"] if not is_brats(n)]


def brats_datasets():
    return [n for n in config["datasets"] if is_brats(n)]


def one_of(names):
    """A wildcard regex matching exactly these names (or nothing)."""
    return "|".join(names) if names else "(?!)"


def scan_row(wildcards):
    row = ROWS.get((wildcards.dataset, wildcards.scan))
    if row is None:
        raise ValueError(
            f"scan {wildcards.scan!r} is not a usable scan of dataset {wildcards.dataset!r}"
            f" (datasets: {sorted(OK)})"
        )
    return row


# What every step needs besides its files and its scan. The scan's identity
# goes on the command line from the wildcards (--scan, --dataset) and the step
# reads subject and session from the id: one static string per rule plans
# faster than a per-scan params function (3 % of a 2,000-subject dry run).
STEP_CONTEXT = as_json(
    {
        "backend": BACKEND,
        "seed": config["seed"],
        "threads": PRE["threads"],
        "deterministic": PRE["deterministic"],
    }
)


def dataset_targets(dataset, key):
    """One file per usable scan of a dataset (e.g. its provenance records)."""
    files = BRATS if is_brats(dataset) else T1
    return [
        files[key].format(dataset=dataset, scan=scan) for scan in OK[dataset]["scan"]
    ]


def record_list(dataset):
    """The file that stands for all of a dataset's provenance records (rule
    record_list): the rules that read every scan take it, as one @FILE argument."""
    return paths.record_list(RESULTS, dataset)


def argfiles(flag, files):
    """`flag @'file' ...`: each file's lines become the flag's arguments."""
    files = [files] if isinstance(files, str) else list(files)
    quoted = " ".join(f"@{shlex.quote(f)}" for f in files)
    return f"{flag} {quoted}" if files else ""


def get_final_output():
    demo = [
        f"{ds['path']}/participants.tsv"
        for ds in config["datasets"].values()
        if ds.get("generate") and ds["kind"] == "bids"
    ]
    return (
        demo
        + [record_list(name) for name in OK]  # each scan's job, through its record
        + [paths.derivatives(RESULTS, name) for name in t1_datasets()]
        + [paths.report_dir(RESULTS)]
        + manifest_targets()
        + [FIREWALL]
        + predict_targets()
        + ([paths.tables_dir(RESULTS)] if finetune_targets("metrics.json") else [])
    )


# --- folds ---

FOLDS = {**config["folds"], "seed": config["folds"]["seed"] or config["seed"]}
FOLDS.pop("overrides")


def datasets_with_role(role):
    return [n for n, ds in config["datasets"].items() if role in ds["role"]]


# --- predictions for new scans (predict.smk) ---

# Datasets with role predict and the fold-ensemble bundles to run on them: each
# trained on inputs preprocessed as this config does (checked here, at start).
PREDICT_DATASETS = datasets_with_role("predict")
with user_errors():
    PREDICT_BUNDLES = ensemble_bundles(
        config["predict"]["bundle"],
        settings_hash(model_input_settings(PRE, BACKEND, brats=False)),
    )
    check_predict_plan(PREDICT_DATASETS, PREDICT_BUNDLES)


def predict_targets():
    return [
        f"{RESULTS}/predict/{dataset}/{bundle}"
        for dataset in PREDICT_DATASETS
        for bundle in PREDICT_BUNDLES
    ]


def manifest_targets():
    return [
        paths.manifest(RESULTS, name, task)
        for name, ds in config["datasets"].items()
        for task in TASKS
        if task in ds["role"]
    ]


def folds_overrides():
    path = config["folds"]["overrides"]
    return [path] if path else []


# --- the demo cohort ---


def generated(kind):
    """Generated dataset roots -> their `generate` spec, for one kind."""
    return {
        ds["path"]: ds["generate"]
        for ds in config["datasets"].values()
        if ds.get("generate") and (ds["kind"] == "brats") == (kind == "brats")
    }


def root_pattern(kind):
    return one_of([re.escape(r) for r in generated(kind)])


# --- the T1 chain ---


def raw_t1(wildcards):
    return scan_row(wildcards)["t1"]


# One job per scan (preprocess/job_per: scan): the step records' params as the
# step-per-job rules pass them, with the QC thresholds for collect.
CHAIN_PARAMS = as_json({**chain_params(PRE, BACKEND, config["qc"]), "qc": config["qc"]})
# The chain's job declares two files: the provenance record, which every later
# rule reads, and the QC strip for Snakemake's report. Each declared file costs
# Snakemake planning time on every scan. The chain writes every file of
# t1_outputs beside them and the training cache under the cache folder, each
# named in its step's record. The rules that read one take the provenance record
# as their input; the cache index and the derivatives name a missing one with
# the file to force (--forcerun), which rebuilds it (docs/preprocessing.md).


def bet_outputs():
    out = {"brain": T1["bet_brain"], "mask": T1["bet_mask"], "record": T1["bet_record"]}
    if BACKEND == "ants":  # the head-to-template affine that flirt refines
        out["xfm"] = T1["bet_xfm"]
    return out


def flirt_inputs():
    names = {"brain": T1["bet_brain"], "mask": T1["bet_mask"]}
    if BACKEND == "ants":  # the head, registered from bet's head-to-template affine
        names["xfm_init"] = T1["bet_xfm"]
        names["t1"] = raw_t1
    return names


def io_args(direction, roles):
    """`--input role={input.role:q} ...` for the named files of a rule (quoted)."""
    return " ".join(f"--{direction} {role}={{{direction}.{role}:q}}" for role in roles)


def shell_args(flag, paths):
    """`flag 'path' ...` for a params string, or "" without paths.

    Params that are whole arguments cannot use Snakemake's `:q`; every path in
    them is quoted here, so no file name reaches the shell as code.
    """
    paths = [paths] if isinstance(paths, str) else list(paths)
    return f"{flag} {shlex.join(paths)}" if paths else ""


def literal_args(**options):
    """`--name 'value' ...` for static params, written into a shell line as they
    stand: Snakemake formats each job's shell line three times while planning, and
    a quoted JSON field costs that on every job. Braces are doubled for its format.
    """
    text = " ".join(f"--{name} {shlex.quote(value)}" for name, value in options.items())
    return text.replace("{", "{{").replace("}", "}}")


def brats_roles():
    """The named inputs of a BraTS case: the configured modalities and the labels."""
    return [*PRE["brats"]["modalities"], "seg"]


def brats_inputs(wildcards):
    row = scan_row(wildcards)
    return {role: row[role] for role in brats_roles()}


wildcard_constraints:
    dataset="|".join(config["datasets"]),
    scan="[A-Za-z0-9_-]+",
    subject="[A-Za-z0-9]+",


# --- training ---

FIREWALL = paths.firewall(RESULTS)
# A received encoder checked against one manifest (the encoder_firewall rule)
ENCODER_FIREWALL = (
    f"{RESULTS}/folds/{{dataset}}_task-{{task}}_encoder-{{backbone}}_firewall.json"
)


def firewall_gate():
    """The firewall as a training input: ordered after it, not retriggered by it.

    A training job that runs waits for the leak check (a leak stops it), but a
    rewritten firewall.json alone does not retrain anything: adding a labelled
    subject re-checks the gate and retrains only the models whose manifest or
    data changed, not pre-training or the other datasets' models.
    """
    return ancient(FIREWALL)


def cache_index(dataset):
    """The file that stands for all of a dataset's caches (rule cache_index)."""
    return paths.cache_index(RESULTS, dataset)


def dataset_caches(dataset):
    """A dataset's cache files: images (and BraTS regions), in scan-table order."""
    caches = [cache_files(dataset, scan) for scan in OK[dataset]["scan"]]
    files = {"images": [c["image"] for c in caches]}
    if is_brats(dataset):
        files["regions"] = [c["regions"] for c in caches]
    return files


def cache_files(dataset, scan):
    """A scan's training-cache files (image, regions) under the results folder."""
    return paths.cache_paths(paths.cache_dir(RESULTS), dataset, scan)


TRAIN = config["train"]
BACKBONES = TRAIN["backbones"]
# Received pre-trained encoders (train/init_from), backbone -> bundle folder, each
# checked against its manifest: that backbone's pretrained runs start from the
# bundle, and it is not pre-trained here.
with user_errors():
    INIT_FROM = encoder_bundles(TRAIN["init_from"], BACKBONES)
# `python`, or torchrun with one process per GPU (train/gpus)
TRAIN_LAUNCH = launcher(TRAIN["gpus"])
FINETUNE = paths.finetune_dir(
    RESULTS, "{dataset}", "{task}", "{backbone}", "{init}", "{frac}", "{fold}"
)


def train_metadata(dataset=None):
    """What a checkpoint records of the preprocessing that made its inputs."""
    brats = dataset is not None and is_brats(dataset)
    digest = settings_hash(model_input_settings(PRE, BACKEND, brats=brats))
    return as_json({"preprocess_hash": digest, "backend": BACKEND})


def stage_config(stage, backbone="medical_transformer"):
    """A stage's medtx.train.config config: seed and labels, then the train/common
    keys, the stage's own (pretrain, finetune), and for PUMIT train/pumit/common and
    train/pumit/<stage> (tokenizer, mim, finetune) on top. The fine-tuning protocol
    (train/finetune) is shared, so both backbones train alike on the same folds."""
    with user_errors():
        return stage_keys(
            backbone,
            stage,
            TRAIN,
            seed=config["seed"],
            label_map=config["folds"]["label_map"],
        )


# Every stage's keys are checked before any job: a misplaced key is one line.
for _backbone in BACKBONES:
    for _stage in STAGE_BLOCKS[_backbone]:
        stage_config(_stage, _backbone)


def stage_files(stage, backbone, key):
    """The file a stage's config names under ``key`` (PUMIT's lpips_weights,
    eva02_weights) as a rule input, so a changed file reruns the stage; none if unset.
    """
    path = stage_config(stage, backbone).get(key)
    return [path] if path else []


def train_threads(stage, backbone="medical_transformer"):
    """A training job's CPUs: torch threads and loader workers of every process."""
    return training_threads(stage_config(stage, backbone), TRAIN["gpus"])


def train_resources(stage, *, runtime, backbone="medical_transformer", step=None):
    """Cluster resources of a training job; GPUs only when train/gpu says so. Memory
    (host mem_mb, GPU gpu_mem_mb) from the measured step cost of the stage at its
    preset, batch and downsample (medtx.train.resources, docs/slurm.md); ``step``
    names the pre-training stage of "pretrain" (exemplar, masked). Fine-tuning's
    depend on the job's backbone and task: functions of its wildcards."""
    with user_errors():  # every job's figures, before any job (a missing row: one line)
        if stage != "finetune":
            return stage_resources(stage, backbone, step or stage, None, runtime)
        for name in BACKBONES:
            for task in TASKS:
                keys = stage_resources(stage, name, stage, task, runtime)
    return {key: finetune_resource(key, runtime) for key in keys}


@functools.cache
def stage_resources(stage, backbone, step, task, runtime):
    return training_resources(
        stage_config(stage, backbone),
        gpu=TRAIN["gpu"],
        gpus=TRAIN["gpus"],
        runtime=runtime,
        step=step,
        task=task,
    )


def finetune_resource(key, runtime):
    """One resource of a fine-tuning job, for its backbone and task wildcards."""
    return lambda w: stage_resources(
        "finetune", w.backbone, "finetune", w.task, runtime
    )[key]


def pretrain_indexes():
    """The cache indexes of the T1 pre-training datasets that have usable scans."""
    return [
        cache_index(name)
        for name in datasets_with_role("pretrain")
        if not is_brats(name) and len(OK[name])
    ]


def finetune_inputs(wildcards):
    ds = wildcards.dataset
    files = {
        "manifest": paths.manifest(RESULTS, ds, wildcards.task),
        "firewall": firewall_gate(),
        "cache_index": cache_index(ds),
    }
    if wildcards.init != "scratch" and wildcards.backbone in INIT_FROM:
        files["init"] = INIT_FROM[wildcards.backbone]
        files["encoder_firewall"] = ENCODER_FIREWALL.format(
            dataset=ds, task=wildcards.task, backbone=wildcards.backbone
        )
    elif wildcards.init != "scratch":
        if not pretrain_indexes():
            raise ValueError(
                f"train/inits has {wildcards.init!r}, but no dataset has role 'pretrain';"
                " add one or use inits: [scratch]"
            )
        files["init"] = pretrained_checkpoint(wildcards.backbone)
    return files


def pretrained_checkpoint(backbone):
    """A backbone's last pre-training stage: what a "pretrained" fine-tuning loads."""
    return paths.pretrain_checkpoint(RESULTS, PRETRAIN_STAGES[backbone][-1])


def inits_of(backbone):
    """The configured inits this backbone has (PUMIT has no notransformer ablation)."""
    return [i for i in TRAIN["inits"] if i in BACKBONE_INITS[backbone]]


def finetune_targets(name):
    return [
        f"{paths.finetune_dir(RESULTS, ds, task, backbone, init, frac, fold)}/{name}"
        for ds, spec in config["datasets"].items()
        for task in TASKS
        if task in spec["role"]
        for backbone in BACKBONES
        for init in inits_of(backbone)
        if init == "scratch" or pretrain_indexes() or backbone in INIT_FROM
        for frac in TRAIN["fractions"]
        for fold in range(config["folds"]["n_folds"])
    ]


# Subgroup metrics (evaluate/subgroups; its bootstrap seeded by the top-level seed)
SUBGROUPS = {"seed": config["seed"], **config["evaluate"]["subgroups"]}


def finetuned_scan_tables():
    """The scan tables (sex, site, age, diagnosis) of every fine-tuned dataset."""
    return [
        paths.scan_table(RESULTS, name)
        for name, spec in config["datasets"].items()
        if any(task in spec["role"] for task in TASKS)
    ]


def pretrain_targets():
    """Every pre-training checkpoint a pretrained fine-tuning needs (for the summary's
    curves and codebook histogram)."""
    if not pretrain_indexes() or not any(i != "scratch" for i in TRAIN["inits"]):
        return []
    return [
        paths.pretrain_checkpoint(RESULTS, stage)
        for backbone in BACKBONES
        if backbone not in INIT_FROM
        for stage in PRETRAIN_STAGES[backbone]
    ]
