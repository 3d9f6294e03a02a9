# Config validation, the scan tables, and the helpers rules use.
import json

from medtx.codehash import code_hash
from medtx.config import validate_config
from medtx.preprocess.backend import resolve_backend
from medtx.preprocess.chain import t1_outputs
from medtx.scans import build_scan_table

validate_config(config)

RESULTS = config["results"]
LOGS = "logs"
BACKEND = resolve_backend(config["preprocess"]["backend"])
PRE = config["preprocess"]

# One table per dataset, built (and checked) once per run from a per-file cache.
SCANS = {
    name: build_scan_table(
        name,
        ds,
        cache_path=f"{RESULTS}/scans/{name}.tsv",
        on_bad_scan=config["on_bad_scan"],
    )
    for name, ds in config["datasets"].items()
}
OK = {name: t[t["status"] == "ok"] for name, t in SCANS.items()}


def as_json(obj):
    """Params as compact, key-sorted JSON: stable strings for the params trigger."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def is_brats(dataset):
    return config["datasets"][dataset]["kind"] == "brats"


def t1_datasets():
    return [n for n in config["datasets"] if not is_brats(n)]


def brats_datasets():
    return [n for n in config["datasets"] if is_brats(n)]


def one_of(names):
    """A wildcard regex matching exactly these names (or nothing)."""
    return "|".join(names) if names else "(?!)"


def scan_row(wildcards):
    table = OK.get(wildcards.dataset)
    if table is None:
        raise ValueError(
            f"unknown dataset {wildcards.dataset!r}; config 'datasets' has {sorted(OK)}"
        )
    rows = table[table["scan"] == wildcards.scan]
    if rows.empty:
        raise ValueError(f"scan {wildcards.scan!r} is not in dataset {wildcards.dataset!r}")
    return rows.iloc[0]


def step_context(wildcards):
    """What a step needs besides files: identity, backend, seed, threads."""
    row = scan_row(wildcards)
    return as_json(
        {
            "scan": wildcards.scan,
            "dataset": wildcards.dataset,
            "subject": row["subject"],
            "backend": BACKEND,
            "seed": config["seed"],
            "threads": PRE["threads"],
            "deterministic": PRE["deterministic"],
        }
    )


# File names of the T1 chain, as patterns with {dataset} and {scan}.
T1 = t1_outputs(f"{RESULTS}/preprocess/{{dataset}}/{{scan}}", "{scan}")


def brats_files(dataset="{dataset}", scan="{scan}"):
    d = f"{RESULTS}/preprocess/{dataset}/{scan}/{scan}_"
    return {
        "image": d + "desc-preproc_mri.nii.gz",
        "seg": d + "desc-preproc_dseg.nii.gz",
        "record": d + "step-brats.json",
        "provenance": d + "provenance.json",
        "qc_png": d + "qc.png",
    }


def scan_targets(key_t1, key_brats=None):
    out = []
    for name, table in OK.items():
        for scan in table["scan"]:
            if is_brats(name):
                if key_brats:
                    out.append(brats_files(name, scan)[key_brats])
            else:
                out.append(T1[key_t1].format(dataset=name, scan=scan))
    return out


def get_final_output():
    demo = [
        f"{ds['path']}/participants.tsv"
        for ds in config["datasets"].values()
        if ds.get("generate") and ds["kind"] == "bids"
    ]
    return demo + scan_targets("preproc", "image") + [f"{RESULTS}/reports/provenance.html"]


wildcard_constraints:
    dataset="|".join(config["datasets"]),
    scan="[A-Za-z0-9_-]+",
    subject="[A-Za-z0-9]+",
