"""Real Snakemake runs of the workflow on the smallest demo cohort.

One real run (module fixture) in a temp directory; the other tests dry-run
against its outputs: the no-op rerun, what a change reruns, exclusions.
Every snakemake call has a hard timeout.
"""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from medtx.workflow.paths import PROVENANCE_SUFFIX
from tests.conftest import REPO, sphere, write_nifti

pytestmark = pytest.mark.integration
SNAKEMAKE = (
    str(REPO / ".venv" / "bin" / "snakemake")
    if (REPO / ".venv" / "bin" / "snakemake").exists()
    else shutil.which("snakemake")
)


def snakemake(workdir, *args, config="ants.yaml", env=None, timeout=900, snakefile=None):
    configfile = config if Path(str(config)).is_absolute() else REPO / "tests" / "configs" / config
    snakefile = snakefile or REPO / "Snakefile"
    cmd = [
        "timeout",
        "-k",
        "10",
        str(timeout),
        SNAKEMAKE,
        "-s",
        str(snakefile),
        "-d",
        str(workdir),
        "--configfile",
        str(configfile),
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout + 30)


def planned(proc) -> dict[str, int]:
    """rule -> job count from a dry run's job stats table."""
    stats, counts = False, {}
    for line in proc.stdout.splitlines():
        if line.startswith("job "):
            stats = True
            continue
        if stats:
            if line.startswith("total"):
                break
            m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
            if m:
                counts[m.group(1)] = int(m.group(2))
    return counts


def edited_config(tmp_path, name, edit) -> Path:
    """tests/configs/ants.yaml with ``edit(config)`` applied, written to tmp_path/name."""
    config = yaml.safe_load((REPO / "tests/configs/ants.yaml").read_text())
    edit(config)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def rerun_plan(proc) -> dict[str, int]:
    """``planned`` without the ``all`` target rule; fails loudly on a bad dry run."""
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    jobs = planned(proc)
    jobs.pop("all", None)
    return jobs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import os

    env = dict(os.environ)
    env["PATH"] = f"{REPO / '.venv' / 'bin'}:{env['PATH']}"
    work = tmp_path_factory.mktemp("wf")
    # about 15 min on a quiet 2-core machine; room for a loaded one
    proc = snakemake(work, "--cores", "2", "all", env=env, timeout=2400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return work, env


def test_lint_is_clean(tmp_path, medtx_env):
    proc = snakemake(tmp_path, "--lint", env=medtx_env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Congratulations, your workflow is in a good condition!" in proc.stdout + proc.stderr


# The T1 chain's rules with preprocess/job_per: step (one job per step)
STEP_RULES = ("bet", "flirt", "n4_correct", "pool_normalize", "collect_provenance")


def test_dry_run_lists_one_job_per_scan(tmp_path, medtx_env):
    proc = snakemake(tmp_path, "-n", "all", env=medtx_env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    jobs = planned(proc)
    assert jobs["preprocess_t1"] == 11, jobs  # two pre-training + nine labelled scans
    assert not set(STEP_RULES) & set(jobs), jobs
    assert jobs["brats_preprocess"] == 3 and jobs["provenance_report"] == 1
    assert jobs["bids_derivatives"] == 2  # one per T1 dataset
    assert jobs["make_folds"] == 3 and jobs["leakage_firewall"] == 1
    # 3 tasks x 3 folds x (3 Medical Transformer + 2 PUMIT initializations) x 1 fraction
    assert jobs["finetune"] == 45 and jobs["pretrain_exemplar"] == 1 and jobs["evaluate"] == 1
    assert jobs["pretrain_tokenizer"] == 1 and jobs["pretrain_mim"] == 1


def test_step_per_job_layout_lists_every_step_per_scan(tmp_path, medtx_env):
    config = edited_config(tmp_path, "steps.yaml", lambda c: c["preprocess"].update(job_per="step"))
    jobs = rerun_plan(snakemake(tmp_path, "-n", "all", config=config, env=medtx_env, timeout=120))
    for rule in STEP_RULES:
        assert jobs[rule] == 11, jobs
    assert "preprocess_t1" not in jobs and jobs["brats_preprocess"] == 3, jobs


def test_fsl_branch_dry_run_builds_fsl_jobs(tmp_path, medtx_env):
    proc = snakemake(tmp_path, "-n", "-p", "all", config="fsl.yaml", env=medtx_env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert planned(proc)["preprocess_t1"] == 1
    assert (
        '{\\"fsl\\":{\\"frac\\":0.5,\\"robust\\":true}}' in proc.stdout
        or '"fsl":{"frac":0.5' in proc.stdout
    )
    assert "desc-init_xfm" not in proc.stdout  # the ants-only transform is not asked for


def test_run_writes_model_inputs_and_report(run):
    import nibabel as nib
    import numpy as np

    work, _ = run
    pre = sorted(work.glob("results/work/*/*/*_res-2_desc-preproc_T1w.nii.gz"))
    assert len(pre) == 11
    for path in pre:
        data = np.asarray(nib.load(str(path)).dataobj)
        assert data.shape == (96, 114, 96) and 0.0 <= data.min() and data.max() == 1.0
    brats = list(work.glob("results/work/mini_brats/*/*_desc-preproc_mri.nii.gz"))
    assert nib.load(str(brats[0])).shape == (160, 192, 128, 4)
    html = (work / "results/reports/provenance/index.html").read_text()
    for scan in ("pre001", "adni001", "adni009", "BraTS20_Training_003"):
        assert scan in html
    # thumbnails are files beside the page, loaded lazily, not embedded
    page = work / "results/reports/provenance/index.html"
    thumbs = list((page.parent / "index_files" / "thumbs").glob("*.png"))
    assert len(thumbs) >= 13 and "data:image" not in html
    assert "face" in html  # the face check's column
    assert (work / "results/demo/adni/participants.tsv").exists()


def test_bids_validator_passes_on_demo_inputs_and_derivatives(run):
    from medtx.data.bids_validation import errors, validate, validator_command

    if validator_command() is None:
        pytest.skip("bids-validator-deno is not installed (it is in the test extras)")
    work, _ = run
    inputs = [work / "results/demo/pretrain", work / "results/demo/adni"]
    derivatives = sorted(p for p in (work / "results/preprocess").iterdir() if p.is_dir())
    assert [p.name for p in derivatives] == ["mini_adni", "mini_pretrain"]
    for root in inputs + derivatives:
        found = errors(validate(root))
        assert found == [], [f.line(root) for f in found]
    preproc = list(work.glob("results/preprocess/mini_adni/sub-*/anat/*_desc-preproc_T1w.nii.gz"))
    assert len(preproc) == 9
    desc = json.loads((derivatives[0] / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["CodeHash"]


def test_snakemake_report_holds_qc_strips_tables_and_figures(run, tmp_path):
    import zipfile

    work, env = run
    out = tmp_path / "report.zip"
    proc = snakemake(work, "--report", str(out), env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    names = zipfile.ZipFile(out).namelist()
    assert sum(n.endswith("_qc.png") for n in names) >= 14  # 11 T1 scans, 3 BraTS cases
    assert any(n.endswith("table1.tsv") for n in names)
    assert any(n.endswith("_roc.png") for n in names) and any(n.endswith("_age.png") for n in names)
    # the provenance report's entry page with the thumbnails it loads
    pages = [n for n in names if n.endswith("/index.html")]
    assert (
        len(pages) == 1
        and sum(n.startswith(pages[0][:-10] + "index_files/thumbs/") for n in names) >= 14
    )


def test_training_outputs_and_tables(run):
    import pandas as pd
    import torch

    work, _ = run
    runs = sorted(
        work.glob("results/finetune/*/task-*/backbone-*/init-*_frac-100/fold-*/metrics.json")
    )
    assert len(runs) == 27 + 18  # Medical Transformer: 3 inits; PUMIT: 2
    pred = pd.read_csv(runs[0].parent / "predictions.tsv", sep="\t")
    manifest = pd.read_csv(next(work.glob("results/folds/*_folds.tsv")), sep="\t", dtype=str)
    assert len(pred) >= 1
    ckpt = torch.load(runs[0].parent / "model.pt", weights_only=True)
    assert ckpt["seed"] == 42 and "model" in ckpt
    stage2 = torch.load(work / "results/pretrain/stage-masked.pt", weights_only=True)
    assert stage2["metadata"]["subjects"] == ["mini_pretrain:pre001", "mini_pretrain:pre002"]
    assert len(stage2["metadata"]["preprocess_hash"]) == 16
    summary = (work / "results/tables/summary.md").read_text()
    assert "Table 1" in summary and "|" in summary
    overlays = sorted(work.glob("results/tables/mini_brats_task-segmentation_*_overlay.png"))
    assert len(overlays) == 3 + 2  # one per backbone and initialization
    assert "## Figures" in summary and f"({overlays[0].name})" in summary
    tokenizer = torch.load(work / "results/pretrain/stage-tokenizer.pt", weights_only=True)
    usage = tokenizer["metadata"]["codebook_usage"]
    assert len(usage) == 64 and sum(usage) > 0  # the tiny preset's codebook
    mim = torch.load(work / "results/pretrain/stage-mim.pt", weights_only=True)
    assert mim["metadata"]["trained"] == ["vit", "mim_head"] and mim["history"]
    assert "pumit" in summary and "## Pre-training" in summary
    # subgroup metrics from the scan tables (sex, site, age band, diagnosis)
    assert "## Subgroups" in summary
    regression = (work / "results/tables/subgroups_regression.md").read_text()
    for attribute in ("| sex |", "| site |", "| diagnosis |"):
        assert attribute in regression
    cards = [run.parent / "model_card.md" for run in runs]
    assert all(card.exists() for card in cards)  # one beside every model
    assert "## Privacy" in cards[0].read_text()
    assert "model_cards.md" in summary
    assert len(manifest) > 0


def test_defaced_copies_pass_the_face_check(run):
    """`snakemake <defaced copy>` (not part of all): quickshear from bet's mask."""
    work, env = run
    target = "results/share/mini_adni/sub-adni001/sub-adni001_desc-defaced_T1w.nii.gz"
    proc = snakemake(work, "--cores", "2", target, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(
        (work / target.replace("desc-defaced_T1w.nii.gz", "step-deface.json")).read_text()
    )
    assert record["tool"]["name"] == "quickshear" and record["qc"]["passed"]
    assert record["input_face"]["face_signal"] > record["qc"]["metrics"]["face_signal"]


def test_provenance_record_per_scan(run):
    work, _ = run
    record = json.loads(next(work.glob("results/work/mini_adni/*/*_provenance.json")).read_text())
    assert [s["step"] for s in record["steps"]] == ["bet", "flirt", "n4", "pool", "normalize"]
    assert record["thumbnail"].endswith("_qc.png")
    checks = {c["metric"] for s in record["steps"] for c in s["qc"]["checks"]}
    assert checks == {
        "voxel_mm_min",
        "voxel_mm_max",
        "fov_mm_min",
        "head_ncc_template",
        "brain_volume_ml",
        "ncc_template",
        "misalignment_mm",
        "dice_template_mask",
        "bias_ratio",
        "face_signal",  # the face check of the model-ready volume, at its margin
        "face_component_ml",
        "face_margin_mm",
    }


def test_unchanged_rerun_schedules_nothing(run):
    work, env = run
    proc = snakemake(work, "-n", "all", env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert planned(proc) == {}, proc.stdout[-2000:]
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_n4_change_reruns_only_n4_and_after(run, tmp_path):
    work, env = run
    config = yaml.safe_load((REPO / "tests/configs/ants.yaml").read_text())
    config["preprocess"]["n4"]["shrink_factor"] = 2
    changed = tmp_path / "n4.yaml"
    changed.write_text(yaml.safe_dump(config))
    jobs = planned(snakemake(work, "-n", "all", config=changed, env=env, timeout=120))
    # every scan's chain job (inside it bet and flirt are skipped: their records
    # match; test_n4_code_edit_reruns_n4_and_after_inside_each_scan_job shows it);
    # everything downstream of N4 follows (manifests read the QC records, training
    # the cached volumes); the demo data and BraTS do not
    assert jobs["preprocess_t1"] == 11, jobs
    # the T1 models (new caches and manifests: 2 tasks x 3 folds x (3 Medical
    # Transformer + 2 PUMIT inits)) and the BraTS models that start from a
    # re-pre-trained checkpoint (3 folds x (2 + 1) inits);
    # BraTS from scratch saw no N4 output and is not retrained
    assert jobs["make_folds"] == 2 and jobs["pretrain_exemplar"] == 1
    assert jobs["pretrain_tokenizer"] == 1 and jobs["pretrain_mim"] == 1
    assert jobs["finetune"] == 30 + 9, jobs
    for rule in ("make_demo_t1", "brats_preprocess"):
        assert rule not in jobs, jobs


def test_finetune_lr_change_reruns_finetune_and_evaluate_only(run, tmp_path):
    work, env = run
    changed = edited_config(tmp_path, "lr.yaml", lambda c: c["train"]["finetune"].update(lr=1e-3))
    jobs = rerun_plan(snakemake(work, "-n", "all", config=changed, env=env, timeout=120))
    # train/finetune is every backbone's protocol: 27 Medical Transformer + 18 PUMIT runs
    assert jobs == {"finetune": 45, "evaluate": 1}, jobs


def test_pumit_settings_rerun_only_pumits_rules(run, tmp_path):
    work, env = run

    def pumit(block, **keys):
        return lambda c: c["train"]["pumit"].setdefault(block, {}).update(keys)

    lr = edited_config(tmp_path, "pumit_lr.yaml", pumit("finetune", lr=1e-3))
    jobs = rerun_plan(snakemake(work, "-n", "all", config=lr, env=env, timeout=120))
    assert jobs == {"finetune": 18, "evaluate": 1}, jobs  # 3 tasks x 3 folds x 2 inits
    ratio = edited_config(tmp_path, "pumit_mim.yaml", pumit("mim", mask_ratio=0.5))
    jobs = rerun_plan(snakemake(work, "-n", "all", config=ratio, env=env, timeout=120))
    assert jobs == {"pretrain_mim": 1, "finetune": 9, "evaluate": 1}, jobs  # pretrained only


def edited_checkout(tmp_path, rel, text):
    """A copy of the checkout (what the Snakefile needs) with ``text`` appended to ``rel``."""
    checkout = tmp_path / "checkout"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    checkout.mkdir()
    for part in ("Snakefile", "workflow", "medtx", "envs"):
        src = REPO / part
        if src.is_dir():
            shutil.copytree(src, checkout / part, ignore=skip)
        else:
            shutil.copy2(src, checkout / part)
    edited = checkout / rel
    edited.write_text(edited.read_text() + text)
    return checkout


def plan_after_code_edit(run, tmp_path, rel, text="\n"):
    """What a dry run of the finished workflow plans once ``rel`` is edited (in a copy)."""
    work, env = run
    checkout = edited_checkout(tmp_path, rel, text)
    env = {**env, "PYTHONPATH": str(checkout)}  # the Snakefile hashes the copy's sources
    return rerun_plan(
        snakemake(work, "-n", "all", env=env, timeout=120, snakefile=checkout / "Snakefile")
    )


def test_model_code_edit_reruns_training_only(run, tmp_path):
    """Editing medtx/models/ (in a copy of the checkout) retrains; nothing else reruns."""
    jobs = plan_after_code_edit(
        run, tmp_path, "medtx/models/slice_transformer.py", "\n# a local edit to the model code\n"
    )
    # both backbones import it (the models package and PUMIT's task defaults)
    assert jobs == {
        "pretrain_exemplar": 1,
        "pretrain_masked": 1,
        "pretrain_tokenizer": 1,
        "pretrain_mim": 1,
        "finetune": 45,
        "evaluate": 1,
    }, jobs


def test_pumit_code_edit_reruns_pumit_pretraining_not_the_medical_transformers(run, tmp_path):
    jobs = plan_after_code_edit(run, tmp_path, "medtx/train/mim.py", "\n# a local edit\n")
    assert jobs == {"pretrain_tokenizer": 1, "pretrain_mim": 1, "finetune": 9, "evaluate": 1}, jobs


def test_whitespace_edit_deep_in_extraction_reruns_extraction_and_after(run, tmp_path):
    """intensity.py is reached by the ants extraction only through antsio.at_resolution:
    the derived hash still covers it, so every scan's extraction and all after it rerun."""
    jobs = plan_after_code_edit(run, tmp_path, "medtx/preprocess/intensity.py", "\n\n")
    assert jobs["preprocess_t1"] == 11, jobs  # every T1 scan (bet's own hash changed)
    assert jobs["brats_preprocess"] == 3 and jobs["collect_brats"] == 3, jobs  # it pools too
    for rule in (
        "provenance_report",
        "make_folds",
        "leakage_firewall",
        "cache_index",
        "pretrain_exemplar",
        "pretrain_masked",
        "pretrain_tokenizer",
        "pretrain_mim",
        "finetune",
        "evaluate",
    ):
        assert jobs.get(rule), (rule, jobs)
    assert not any(rule.startswith("make_demo") for rule in jobs), jobs


def test_edit_to_an_evaluation_only_module_reruns_evaluation_alone(run, tmp_path):
    jobs = plan_after_code_edit(run, tmp_path, "medtx/evaluate/figures.py", "\n")
    assert jobs == {"evaluate": 1}, jobs


def test_adding_a_subject_runs_only_its_preprocessing_and_training(run, tmp_path):
    """A new subject in a BIDS dataset: its own chain, then the folds and the models
    of that dataset; no other scan, no pre-training, no other dataset's models."""
    from medtx.data.demo import plan_t1_cohort

    work, env = run
    sandbox = tmp_path / "wf"
    shutil.copytree(work, sandbox, symlinks=True)  # copy2 keeps the mtimes
    spec = yaml.safe_load((REPO / "tests/configs/ants.yaml").read_text())["datasets"]["mini_adni"][
        "generate"
    ]
    # the labelled dataset read from disk as a plain BIDS folder, as a user's cohort is
    on_disk = edited_config(
        tmp_path, "bids.yaml", lambda c: c["datasets"]["mini_adni"].pop("generate")
    )
    touched = snakemake(
        sandbox, "--touch", "--cores", "1", "all", config=on_disk, env=env, timeout=300
    )
    assert touched.returncode == 0, touched.stderr[-3000:]
    assert rerun_plan(snakemake(sandbox, "-n", "all", config=on_disk, env=env, timeout=120)) == {}

    bids = sandbox / "results/demo/adni"
    new = plan_t1_cohort({**spec, "n_subjects": 10})[-1]
    made = subprocess.run(
        [
            "medtx",
            "demo",
            "t1-scan",
            "--spec",
            json.dumps({**spec, "n_subjects": 10}),
            "--subject",
            new["subject"],
            "--out",
            str(bids / new["t1"]),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert made.returncode == 0, made.stderr
    with (bids / "participants.tsv").open("a") as f:
        f.write(
            f"sub-{new['subject']}\t{new['age']}\t{new['sex']}\t{new['diagnosis']}\t{new['site']}\n"
        )
    jobs = rerun_plan(snakemake(sandbox, "-n", "all", config=on_disk, env=env, timeout=120))
    assert jobs.pop("preprocess_t1") == 1, jobs
    # mini_adni: 2 tasks x 3 folds x (3 + 2) inits; the report lists every scan
    assert jobs == {
        "scan_table": 1,  # the new subject's dataset: its table gains a row
        "record_list": 1,  # and its list of records
        "provenance_report": 1,
        "bids_derivatives": 1,  # the new subject's dataset
        "make_folds": 2,
        "leakage_firewall": 1,
        "cache_index": 1,
        "finetune": 30,
        "evaluate": 1,
    }, jobs


def test_qc_threshold_change_rejudges_without_recomputing(run, tmp_path):
    work, env = run
    config = yaml.safe_load((REPO / "tests/configs/ants.yaml").read_text())
    config["qc"] = {"ncc_min": 0.9}
    changed = tmp_path / "qc.yaml"
    changed.write_text(yaml.safe_dump(config))
    jobs = planned(snakemake(work, "-n", "all", config=changed, env=env, timeout=120))
    assert {"preprocess_t1", "collect_brats", "provenance_report", "make_folds"} <= set(jobs)
    assert "brats_preprocess" not in jobs, jobs
    # inside each scan's job every image step is skipped, and collect rejudges
    starts, logs, verdicts = rerun_t1_chains(run, tmp_path, config=changed)
    for scan, (before, after) in starts.items():
        assert after == before, scan  # no step record rewritten
        assert logs[scan].count("; skipped") == 4, logs[scan]  # bet flirt n4 pool_normalize
    # each provenance record judged again, against the new threshold
    assert all(v["thresholds"]["ncc_min"] == 0.9 for v in verdicts.values()), verdicts


def t1_step_starts(results: Path) -> dict[str, dict[str, str]]:
    """scan -> step -> its record's start time, for every T1 scan."""
    out = {}
    for bet in results.glob("work/*/*/*_step-bet.json"):
        scan = bet.name.removesuffix("_step-bet.json")
        out[scan] = {
            step: json.loads((bet.parent / f"{scan}_step-{step}.json").read_text())["start"]
            for step in ("bet", "flirt", "n4", "pool", "normalize")
        }
    return out


def rerun_t1_chains(run, tmp_path, *, config="ants.yaml", env=None, snakefile=None):
    """Run every T1 scan's chain job again in a copy of the finished run.

    Returns scan -> (step starts before, after), scan -> the job's log, and
    scan -> the QC block (thresholds) of its new provenance record.
    """
    work, run_env = run
    sandbox = tmp_path / "rerun"
    shutil.copytree(work, sandbox, symlinks=True)  # copy2 keeps the mtimes
    before = t1_step_starts(sandbox / "results")
    targets = [
        str(p.relative_to(sandbox)) for p in sandbox.glob("results/work/*/*/*_provenance.json")
    ]
    targets = [t for t in targets if Path(t).name.removesuffix("_provenance.json") in before]
    proc = snakemake(
        sandbox,
        "--cores",
        "2",
        *targets,
        config=config,
        env=env or run_env,
        timeout=900,
        snakefile=snakefile,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    after = t1_step_starts(sandbox / "results")
    logs, verdicts = {}, {}
    for scan in before:
        dataset = next(sandbox.glob(f"results/work/*/{scan}")).parent.name
        logs[scan] = (sandbox / f"logs/preprocess/preprocess_t1/{dataset}/{scan}.log").read_text()
        record = sandbox / f"results/work/{dataset}/{scan}/{scan}_provenance.json"
        verdicts[scan] = json.loads(record.read_text())["qc"]
    assert len(before) == 11
    return {scan: (before[scan], after[scan]) for scan in before}, logs, verdicts


def test_n4_code_edit_reruns_n4_and_after_inside_each_scan_job(run, tmp_path):
    """An edit to N4's code reruns the chain job of every T1 scan; inside it bet and
    flirt are skipped (their records keep their start times) and n4, pool and
    normalize run again."""
    checkout = edited_checkout(tmp_path, "medtx/preprocess/n4.py", "\n# a local edit to N4\n")
    env = {**run[1], "PYTHONPATH": str(checkout)}
    starts, logs, _ = rerun_t1_chains(run, tmp_path, env=env, snakefile=checkout / "Snakefile")
    for scan, (before, after) in starts.items():
        print(scan, {step: (before[step], after[step]) for step in before})
        assert after["bet"] == before["bet"] and after["flirt"] == before["flirt"], scan
        for step in ("n4", "pool", "normalize"):
            assert after[step] > before[step], (scan, step)
        assert "bet: unchanged" in logs[scan] and "n4: ran" in logs[scan], logs[scan]


def test_a_deleted_cache_is_named_and_forcing_its_record_rebuilds_it(run, tmp_path):
    """A T1 job declares its record and QC strip, not its cache, so a deleted cache
    alone reruns nothing. The cache index names it with the record to force;
    ``--forcerun`` on that record reruns the scan's job, which skips bet, flirt and
    n4 and rebuilds the cache. No other scan's job runs."""
    work, env = run
    sandbox = tmp_path / "sandbox"
    shutil.copytree(work, sandbox, symlinks=True)  # copy2 keeps the mtimes
    before = t1_step_starts(sandbox / "results")
    cache = sorted((sandbox / "results/cache/mini_adni").glob("*.npy"))[0]
    scan = cache.stem
    record = f"results/work/mini_adni/{scan}/{scan}{PROVENANCE_SUFFIX}"
    cache.unlink()
    index = "results/cache/mini_adni.index.tsv"
    assert rerun_plan(snakemake(sandbox, "-n", index, env=env)) == {}
    proc = snakemake(sandbox, "--cores", "1", "--forcerun", "cache_index", index, env=env)
    assert proc.returncode != 0
    named = f"results/cache/mini_adni/{scan}.npy: the training cache of scan {scan} is missing"
    line = f"{named}; run again with --forcerun {record}: its job rebuilds it"
    assert line in proc.stderr, proc.stderr[-3000:]
    proc = snakemake(sandbox, "--cores", "2", "--forcerun", record, index, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert cache.is_file()
    after = t1_step_starts(sandbox / "results")
    assert {s: after[s] for s in after if s != scan} == {s: before[s] for s in before if s != scan}
    assert all(after[scan][step] == before[scan][step] for step in ("bet", "flirt", "n4"))
    assert all(after[scan][step] > before[scan][step] for step in ("pool", "normalize"))


def test_audit_finds_changed_output(run, tmp_path):
    work, env = run
    ok = subprocess.run(
        ["medtx", "audit", "results"], cwd=work, env=env, capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    shutil.copytree(work / "results", tmp_path / "results")  # recorded paths are relative
    victim = next((tmp_path / "results/work/mini_adni").glob("*/*_desc-n4_T1w.nii.gz"))
    victim.write_bytes(victim.read_bytes()[:-10] + b"0123456789")
    bad = subprocess.run(
        ["medtx", "audit", "results"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert bad.returncode == 1
    assert victim.name in bad.stdout and "changed" in bad.stdout


def test_bad_scan_fail_and_exclude(run, tmp_path):
    """A bad scan stops the run (fail) or is excluded and reported (exclude)."""
    work, env = run
    cohort = tmp_path / "csvdata"
    write_nifti(cohort / "good.nii.gz", sphere(shape=(40, 48, 40), radius=15))
    (cohort / "bad.nii.gz").write_bytes(b"not an image at all")
    (cohort / "scans.csv").write_text("subject,t1,age\nok1,good.nii.gz,60\nbad1,bad.nii.gz,61\n")
    config = yaml.safe_load((REPO / "tests/configs/ants.yaml").read_text())
    config["datasets"]["extra"] = {
        "kind": "csv",
        "role": ["regression"],
        "path": str(cohort / "scans.csv"),
    }
    failing = tmp_path / "fail.yaml"
    failing.write_text(yaml.safe_dump(config))
    before = {p: p.stat().st_mtime_ns for p in work.glob("results/work/**/*") if p.is_file()}
    proc = snakemake(work, "-n", "all", config=failing, env=env, timeout=120)
    assert proc.returncode != 0
    assert f"{cohort / 'bad.nii.gz'}: not a readable NIfTI" in proc.stdout + proc.stderr
    config["on_bad_scan"] = "exclude"
    excluding = tmp_path / "exclude.yaml"
    excluding.write_text(yaml.safe_dump(config))
    jobs = planned(snakemake(work, "-n", "all", config=excluding, env=env, timeout=120))
    assert jobs.get("preprocess_t1") == 1  # only the good new scan
    assert jobs.get("scan_table") == 1  # the new dataset's table: written by a job
    tsv = work / "results/scans/extra.tsv"
    assert not tsv.exists()  # a dry run writes nothing
    made = snakemake(
        work, "--cores", "1", "results/scans/extra.tsv", config=excluding, env=env, timeout=300
    )
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    table = tsv.read_text()
    assert "excluded" in table and "bad.nii.gz: not a readable NIfTI" in table
    after = {p: p.stat().st_mtime_ns for p in before}
    assert after == before  # nothing computed before was touched


def test_a_spawned_job_reads_the_scan_table_its_planner_wrote(tmp_path, medtx_env):
    """A job Snakemake spawns on a cluster (``--mode remote``, as each SLURM job runs)
    reads the workflow again: it takes the scan tables written under the lock instead
    of checking every image again, so an image gone since stops a plan, not the job."""
    cohort = tmp_path / "cohort"
    for subject in ("a", "b"):
        write_nifti(cohort / f"{subject}.nii.gz", sphere(shape=(40, 48, 40), radius=15))
    (cohort / "scans.csv").write_text("subject,t1,age\na,a.nii.gz,60\nb,b.nii.gz,61\n")
    dataset = {"kind": "csv", "role": ["regression"], "path": str(cohort / "scans.csv")}
    config = edited_config(tmp_path, "spawned.yaml", lambda c: c.update(datasets={"d": dataset}))
    work, target = tmp_path / "work", "results/work/d.records.txt"
    made = snakemake(work, "--cores", "1", "results/scans/d.tsv", config=config, env=medtx_env)
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    (cohort / "b.nii.gz").unlink()
    plan = snakemake(work, "-n", target, config=config, env=medtx_env, timeout=120)
    assert plan.returncode != 0
    assert f"{cohort / 'b.nii.gz'}: file does not exist" in plan.stdout + plan.stderr
    spawned = snakemake(work, "-n", "--mode", "remote", target, config=config, env=medtx_env)
    assert rerun_plan(spawned) == {"preprocess_t1": 2, "record_list": 1}


def test_fold_manifests_subject_level_and_complete(run):
    import pandas as pd

    work, _ = run
    folds = work / "results/folds"
    for task in ("classification", "regression"):
        manifest = pd.read_csv(folds / f"mini_adni_task-{task}_folds.tsv", sep="\t", dtype=str)
        assert len(manifest) == 9 and manifest["subject"].is_unique
        assert sorted(manifest["fold"].astype(int).value_counts().tolist()) == [3, 3, 3]
        for k in range(3):
            roles = manifest.set_index("fold")[f"role_{k}"]
            assert set(roles.loc[str(k)]) == {"test"} and set(roles.loc[str((k + 1) % 3)]) == {
                "val"
            }
        sidecar = json.loads((folds / f"mini_adni_task-{task}_folds.json").read_text())
        assert sidecar["seed"] == 42 and len(sidecar["subjects_sha256"]) == 64
    seg = pd.read_csv(folds / "mini_brats_task-segmentation_folds.tsv", sep="\t", dtype=str)
    assert len(seg) == 3 and seg["path"].str.endswith("_desc-preproc_mri.nii.gz").all()
    cls = pd.read_csv(folds / "mini_adni_task-classification_folds.tsv", sep="\t", dtype=str)
    # one CN, one MCI, one AD per fold
    assert (cls.groupby("fold")["label"].nunique() == 3).all()
    assert json.loads((folds / "firewall.json").read_text())["status"] == "passed"


def test_manifests_are_reproducible(run, tmp_path):
    work, env = run
    folds = work / "results/folds"
    before = {p.name: p.read_bytes() for p in folds.glob("*_folds.tsv")}
    # --until: --forcerun alone would also retrain everything downstream of the manifests
    proc = snakemake(
        work,
        "--cores",
        "1",
        "--forcerun",
        "make_folds",
        "--until",
        "leakage_firewall",
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in folds.glob("*_folds.tsv")} == before


def test_declared_identity_leak_stops_before_training(run, tmp_path):
    """A pre-training subject declared to be a labelled subject: the firewall fails."""
    work, env = run
    config = yaml.safe_load((REPO / "tests/configs/ants.yaml").read_text())
    config["identities"] = {"person1": ["mini_pretrain:pre001", "mini_adni:adni004"]}
    leaky = tmp_path / "leak.yaml"
    leaky.write_text(yaml.safe_dump(config))
    firewall = work / "results/folds/firewall.json"
    before = firewall.read_bytes()
    proc = snakemake(work, "--cores", "1", "folds", config=leaky, env=env, timeout=300)
    assert proc.returncode != 0
    log = (work / "logs/folds/leakage_firewall.log").read_text()
    assert "adni004" in log and "pre001" in log
    assert log.strip().splitlines()[-1].startswith("medtx: error:")
    assert not firewall.exists() or firewall.read_bytes() != before  # no stale pass left
    # restore the passing firewall for the tests that follow
    assert snakemake(work, "--cores", "1", "folds", env=env, timeout=300).returncode == 0


def test_qc_failure_gates_manifest_and_override_restores(run, tmp_path):
    import pandas as pd

    shared, env = run
    work = tmp_path / "wf"
    shutil.copytree(shared, work, symlinks=True)  # copy2 keeps the mtimes
    config = yaml.safe_load((REPO / "tests/configs/ants.yaml").read_text())
    records = {
        r["scan"]: r
        for r in (
            json.loads(p.read_text())
            for p in work.glob("results/work/mini_adni/*/*_provenance.json")
        )
    }
    volumes = sorted(
        (r["steps"][0]["qc"]["metrics"]["brain_volume_ml"], s) for s, r in records.items()
    )
    smallest_volume, smallest = volumes[0]
    config["qc"] = {"brain_volume_ml": [smallest_volume + 0.05, 5000]}  # fails exactly one scan
    config["results"] = "results"
    gated = tmp_path / "gated.yaml"
    gated.write_text(yaml.safe_dump(config))
    target = "results/folds/mini_adni_task-regression_folds.tsv"
    proc = snakemake(work, "--cores", "2", target, config=gated, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = pd.read_csv(work / target, sep="\t", dtype=str)
    assert smallest not in set(manifest["scan"])
    sidecar = json.loads((work / target.replace(".tsv", ".json")).read_text())
    (excl,) = [e for e in sidecar["exclusions"] if e["scan"] == smallest]
    assert "QC failed" in excl["reason"] and "brain_volume_ml" in excl["reason"]
    overrides = tmp_path / "overrides.tsv"
    overrides.write_text(f"scan\taction\treason\n{smallest}\tinclude\tvisually fine\n")
    config["folds"]["overrides"] = str(overrides)
    gated.write_text(yaml.safe_dump(config))
    proc = snakemake(work, "--cores", "2", target, config=gated, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = pd.read_csv(work / target, sep="\t", dtype=str)
    assert smallest in set(manifest["scan"])
    assert "visually fine" in (work / target.replace(".tsv", ".json")).read_text()


def medtx_in(work, env, *args):
    """`python -m medtx ARGS` in the run's folder; it must succeed."""
    proc = subprocess.run(
        [str(REPO / ".venv/bin/python"), "-m", "medtx", *map(str, args)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_predict_from_raw_scans_gives_what_the_evaluation_gave(run, tmp_path):
    """`medtx export` of a trained classifier, then `medtx predict` on a raw T1 that
    was in a test fold: the bundle's preprocessing and that fold's model give the
    evaluation's probabilities; the workflow's predict target on the same scan gives
    the command's. The brain-age bundle carries each fold's validation-fitted
    age-bias line."""
    import pandas as pd

    work, env = run
    config = REPO / "tests/configs/ants.yaml"

    def medtx(*args):
        return medtx_in(work, env, *args)

    runs = work / "results/finetune/mini_adni"
    tail = "backbone-pumit/init-scratch_frac-100"
    classifier = tmp_path / "classifier"
    medtx("export", runs / "task-classification" / tail, "--out", classifier, "--config", config)
    tested = pd.read_csv(runs / "task-classification" / tail / "fold-0/predictions.tsv", sep="\t")
    scan = tested["scan"].iloc[0]
    raw = work / f"results/demo/adni/{scan}/anat/{scan}_T1w.nii.gz"
    proc = medtx("predict", classifier, raw, "--out", tmp_path / "pred")
    assert proc.stdout.splitlines()[1].startswith(f"{scan}\t")
    by_fold = pd.read_csv(tmp_path / "pred/predictions_by_fold.tsv", sep="\t")
    ours = by_fold[by_fold["fold"] == 0].iloc[0]
    theirs = tested.iloc[0]
    probs = sorted(c for c in tested.columns if c.startswith("p_"))
    assert len(probs) == 3
    for column in probs:
        assert ours[column] == pytest.approx(theirs[column], abs=1e-5), column
    # the model input is the workflow's own, byte for byte
    from medtx.workflow import paths

    cached = work / paths.cache_paths(paths.cache_dir("results"), "mini_adni", scan)["image"]
    assert (tmp_path / "pred" / scan / f"{scan}_input.npy").read_bytes() == cached.read_bytes()

    # the workflow's own predict target: the same raw scan as a dataset with role
    # predict, through the same bundle, from the workflow's preprocessing and caches
    new = tmp_path / "new_bids" / "sub-new1" / "anat"
    new.mkdir(parents=True)
    shutil.copy2(raw, new / "sub-new1_T1w.nii.gz")

    def predicting(c):
        c["datasets"]["new"] = {"kind": "bids", "role": ["predict"], "path": str(new.parents[1])}
        c["predict"] = {"bundle": [str(classifier)]}

    plan = edited_config(tmp_path, "predict.yaml", predicting)
    target = f"results/predict/new/{classifier.name}"
    proc = snakemake(work, "--cores", "2", target, config=plan, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    workflow = pd.read_csv(work / target / "predictions.tsv", sep="\t").iloc[0]
    command = pd.read_csv(tmp_path / "pred/predictions.tsv", sep="\t").iloc[0]
    assert workflow["scan"] == "sub-new1" and workflow["qc_passed"]
    for column in ("p_CN", "p_MCI", "p_AD"):
        assert workflow[column] == pytest.approx(command[column], abs=1e-5), column

    ages = tmp_path / "ages"
    medtx("export", runs / "task-regression" / tail, "--out", ages, "--config", config)
    meta = json.loads((ages / "bundle.json").read_text())
    for fold in meta["folds"]:
        metrics = json.loads(
            (runs / "task-regression" / tail / f"fold-{fold['fold']}/metrics.json").read_text()
        )
        assert fold["age_bias"] == metrics["age_bias"]
        assert fold["age_bias"]["fitted_on"] == "validation"


def test_init_from_a_received_encoder_replaces_pretraining_and_a_leak_is_refused(run, tmp_path):
    """`medtx export` of the Medical Transformer's stage-2 checkpoint, given back as
    `train: {init_from: ...}`: its pre-training is not planned, its pretrained runs
    retrain in the same run, each behind a check of the bundle against its manifest;
    a bundle subject declared the same person as a test subject stops that check."""
    work, env = run
    bundle = tmp_path / "encoder"
    ants = REPO / "tests/configs/ants.yaml"
    proc = medtx_in(
        work, env, "export", "results/pretrain/stage-masked.pt", "--out", bundle, "--config", ants
    )
    assert "medical_transformer encoder (pretrain_masked), 2 pre-training subjects" in proc.stdout

    def received(c):
        c["train"]["init_from"] = [str(bundle)]

    plan = edited_config(tmp_path, "init_from.yaml", received)
    jobs = rerun_plan(snakemake(work, "-n", "all", config=plan, env=env, timeout=120))
    # the Medical Transformer's pretrained and notransformer runs of 3 dataset-tasks x 3
    # folds, each behind its dataset-task's encoder check; nothing is pre-trained
    assert jobs == {"encoder_firewall": 3, "finetune": 2 * 3 * 3, "evaluate": 1}, jobs

    def leak(c):
        received(c)
        c["identities"] = {"person1": ["mini_pretrain:pre001", "mini_adni:adni004"]}

    leaky = edited_config(tmp_path, "leak.yaml", leak)
    name = "mini_adni_task-regression_encoder-medical_transformer"
    target = f"results/folds/{name}_firewall.json"
    proc = snakemake(work, "--cores", "1", target, config=leaky, env=env, timeout=300)
    assert proc.returncode != 0
    log = (work / f"logs/folds/encoder_firewall/{name}.log").read_text()
    assert (
        "mini_adni:adni004 (declared the same person as mini_pretrain:pre001) is a pre-training"
        f" subject of the encoder bundle {bundle}"
    ) in log
    assert not (work / target).exists()


def test_a_user_config_that_names_datasets_replaces_the_demo(tmp_path, medtx_env):
    """From the repository root, where config.yaml (the demo) sits: tests/configs/fsl.yaml
    plans exactly what it plans anywhere else, and the first line says which config and
    datasets are in effect. A config without datasets still extends the demo."""
    root = edited_checkout(tmp_path, "Snakefile", "")
    shutil.copy2(REPO / "config.yaml", root / "config.yaml")
    env = {**medtx_env, "PYTHONPATH": str(root)}
    fsl = REPO / "tests/configs/fsl.yaml"
    here = snakemake(
        root, "-n", "all", config=fsl, env=env, timeout=120, snakefile=root / "Snakefile"
    )
    elsewhere = snakemake(tmp_path / "else", "-n", "all", config=fsl, env=env, timeout=120)
    assert rerun_plan(here) == rerun_plan(elsewhere)
    # 23 with `all`: the scan's one preprocessing job, one that writes the dataset's
    # scan table (under the lock) and one its record list, among them
    assert sum(rerun_plan(here).values()) == 22, rerun_plan(here)
    first = here.stderr.splitlines()[0]
    assert first == (
        f"medtx: config {fsl} ({fsl} names its datasets: the demo's config.yaml is not used);"
        " datasets: mini_adni"
    )
    seed_only = tmp_path / "seed.yaml"
    seed_only.write_text("seed: 7\n")
    demo = snakemake(
        root, "-n", "all", config=seed_only, env=env, timeout=120, snakefile=root / "Snakefile"
    )
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert demo.stderr.splitlines()[0] == (
        f"medtx: config config.yaml, {seed_only}; datasets: demo_pretrain, demo_adni, demo_brats"
    )
