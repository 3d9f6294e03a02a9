"""The ``medtx`` command: what Snakemake rules call, and tools for users.

    medtx preprocess T1.nii.gz --out DIR [--backend auto|fsl|ants] [--config FILE]
    medtx step {bet,flirt,n4,pool_normalize,brats} --input ROLE=PATH ... --output ROLE=PATH ...
    medtx collect --record FILE ... --out FILE [--thumbnail PNG] [--qc JSON]
    medtx report --config FILE --out HTML
    medtx folds --dataset D --task T --table TSV --records JSON ... --params JSON ...
    medtx firewall --manifest TSV ... --pretrain-table TSV ... --out JSON
    medtx pretrain {exemplar,masked} --images NPY ... --out PT [--init PT] --config JSON
    medtx finetune --task T --manifest TSV --rotation K --fraction P --init PT|none ...
    medtx evaluate --metrics JSON ... --out-dir DIR
    medtx params [--format text|tsv]
    medtx audit [ROOT]
    medtx demo {t1-scan,t1-participants,brats-case} --spec JSON ...

A user error (bad scan, bad config, missing FSL) prints one line,
``medtx: error: ...``, as the log's last line and exits 1; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medtx.errors import MedtxError
from medtx.scan_ids import SCAN_ID_PATTERN, scan_identity


def _pairs(values: list[str] | None, what: str) -> dict[str, str]:
    out = {}
    for item in values or []:
        if "=" not in item:
            raise MedtxError(f"{what} must be ROLE=PATH, got {item!r}")
        role, path = item.split("=", 1)
        out[role] = path
    return out


def _json(text: str | None, what: str) -> dict:
    if not text:
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise MedtxError(f"{what} is not valid JSON: {err}") from err


def default_scan_id(t1: str) -> str:
    """``sub-01_ses-2_T1w.nii.gz`` -> ``sub-01_ses-2``; other names -> ``sub-<alnum>``."""
    name = Path(t1).name.split(".")[0].removesuffix("_T1w")
    if SCAN_ID_PATTERN.match(name):
        return name
    return "sub-" + ("".join(c for c in name if c.isalnum()) or "scan")


def cmd_preprocess(args: argparse.Namespace) -> int:
    from medtx.config import load_config
    from medtx.preprocess.backend import resolve_backend
    from medtx.preprocess.chain import run_chain
    from medtx.preprocess.context import StepContext

    config = load_config(args.config)
    settings = config["preprocess"]
    backend = resolve_backend(args.backend or settings["backend"])
    if backend == "fsl":
        from medtx.preprocess.backend import require_fsl

        require_fsl()
    scan = args.scan or default_scan_id(args.t1)
    scan_identity(scan)  # a --scan that is not sub-<id>[_ses-<id>] is named here
    ctx = StepContext(scan=scan, backend=backend, seed=config["seed"],
                      threads=args.threads or settings["threads"],
                      deterministic=settings["deterministic"])
    out = run_chain(args.t1, args.out, ctx=ctx, settings=settings, qc=config["qc"])
    print(json.dumps(out, indent=2))
    return 0


def cmd_step(args: argparse.Namespace) -> int:
    from medtx.preprocess.context import StepContext

    i, o = _pairs(args.input, "--input"), _pairs(args.output, "--output")
    params = _json(args.params, "--params")
    context = _json(args.context, "--context")
    if args.scan:  # the rules pass the id; subject and session are read from it
        context.update(scan=args.scan, **scan_identity(args.scan, brats=args.step == "brats"))
    if args.dataset:
        context["dataset"] = args.dataset
    ctx = StepContext(**context)
    if args.step == "bet":
        from medtx.preprocess.bet import run_bet

        run_bet(i["t1"], brain_out=o["brain"], mask_out=o["mask"], xfm_out=o.get("xfm"),
                record_out=o["record"], ctx=ctx, params=params)
    elif args.step == "flirt":
        from medtx.preprocess.flirt import run_flirt

        run_flirt(i["brain"], i["mask"], brain_out=o["brain"], mask_out=o["mask"],
                  xfm_out=o["xfm"], record_out=o["record"], ctx=ctx, params=params,
                  xfm_init=i.get("xfm_init"))
    elif args.step == "n4":
        from medtx.preprocess.n4 import run_n4

        run_n4(i["brain"], i["mask"], n4_out=o["n4"], record_out=o["record"], ctx=ctx,
               params=params)
    elif args.step == "pool_normalize":
        from medtx.preprocess.intensity import run_pool_normalize

        run_pool_normalize(i["image"], i["mask"], pooled_out=o["pooled"], mask_out=o["mask"],
                           pool_record_out=o["pool_record"], image_out=o["image"],
                           record_out=o["record"], cache_out=o.get("cache"), ctx=ctx,
                           params=params)
    elif args.step == "brats":
        from medtx.preprocess.brats import run_brats

        images = {k: v for k, v in i.items() if k != "seg"}
        run_brats(images, i.get("seg"), image_out=o["image"], seg_out=o.get("seg"),
                  record_out=o["record"], ctx=ctx, params=params, cache_out=o.get("cache"),
                  regions_out=o.get("regions"))
    return 0


def cmd_collect(args: argparse.Namespace) -> int:
    """Merge a scan's step records and draw its QC thumbnails.

    The records name the scan and every file the steps read and wrote, so the
    thumbnail rows are found there, not passed on the command line.
    """
    from medtx.preprocess.brats import brats_panels
    from medtx.preprocess.chain import t1_panels
    from medtx.provenance import load_step_records, merge_steps
    from medtx.qc_images import scan_thumbnails

    steps = load_step_records(args.record)
    extra = {}
    if args.thumbnail:
        is_brats = any(s.get("step") == "brats" for s in steps)
        scan_thumbnails(brats_panels(steps) if is_brats else t1_panels(steps), args.thumbnail)
        extra["thumbnail"] = args.thumbnail
    merge_steps(steps, args.out, qc=_json(args.qc, "--qc"), extra=extra)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import pandas as pd

    from medtx.report import build_report, load_scan_records

    records = load_scan_records(args.records) if args.records else []
    exclusions = []
    for table in args.scan_table or []:
        df = pd.read_csv(table, sep="\t", dtype=str, keep_default_na=False)
        for row in df[df["status"] == "excluded"].to_dict("records"):
            exclusions.append({"dataset": row["dataset"], "subject": row["subject"],
                               "session": row["session"] or None,
                               "path": row["t1"] or row["flair"] or "", "reason": row["reason"]})
    settings = _json(args.settings, "--settings")
    build_report(records, exclusions, settings, args.out)
    return 0


def cmd_folds(args: argparse.Namespace) -> int:
    """One dataset x task manifest, QC-gated, from the scan table and records."""
    import pandas as pd

    from medtx.folds import load_overrides, load_qc, make_manifest, write_manifest
    from medtx.report import load_scan_records

    params = _json(args.params, "--params")
    table = pd.read_csv(args.table, sep="\t", dtype=str, keep_default_na=False)
    records = load_scan_records(args.records) if args.records else []
    records = [r for r in records if r.get("dataset") == args.dataset]
    paths = {}
    for rec in records:
        outputs = [o for step in rec["steps"] for o in step["outputs"] if o["role"] == "preproc"]
        if outputs:
            paths[rec["scan"]] = outputs[-1]["path"]
    overrides = load_overrides(args.overrides, reasons=True) if args.overrides else None
    manifest, sidecar = make_manifest(
        table, dataset=args.dataset, task=args.task, n_folds=params["n_folds"],
        seed=params["seed"], paths=paths, label_map=params.get("label_map"),
        age_bins=params.get("age_bins"), fractions=params["fractions"],
        qc=load_qc(records, dataset=args.dataset), overrides=overrides,
        method=params.get("method", "hash"),
    )
    write_manifest(manifest, sidecar, args.out_tsv, args.out_json)
    return 0


def cmd_firewall(args: argparse.Namespace) -> int:
    """Fail, naming subjects, if any subject could leak between splits or stages."""
    import pandas as pd

    from medtx.folds import check_leakage, read_manifest
    from medtx.io import write_json

    manifests = {Path(p).name.removesuffix("_folds.tsv"): read_manifest(p) for p in args.manifest}
    pretrain = []
    for table in args.pretrain_table or []:
        df = pd.read_csv(table, sep="\t", dtype=str, keep_default_na=False)
        ok = df[df["status"] == "ok"]
        pretrain += [(d, s) for d, s in zip(ok["dataset"], ok["subject"])]
    identities = _json(args.identities, "--identities")
    check_leakage(manifests, pretrain, identities)
    write_json({"status": "passed", "manifests": sorted(manifests),
                "pretrain_subjects": len(set(pretrain)), "identities": identities}, args.out)
    return 0


INTERRUPTED = 3  # exit code of a training job stopped at a checkpoint (rerun resumes)


def _pretrain_items(images: list[str]) -> list[dict]:
    """Items from cache paths ``<cache>/<dataset>/sub-<id>[_ses-<id>].npy``."""
    items = []
    for p in images:
        scan = Path(p).stem
        subject = scan.split("_ses-")[0].removeprefix("sub-")
        items.append({"scan": scan, "image": p, "label": "", "subject": subject,
                      "dataset": Path(p).parent.name})
    return items


def cmd_pretrain(args: argparse.Namespace) -> int:
    from medtx import stages

    config = _json(args.config, "--config")
    meta = _json(args.metadata, "--metadata")
    items = _pretrain_items(args.images)
    if args.stage == "exemplar":
        result = stages.pretrain_exemplar(items, out=args.out, config=config, metadata=meta)
    else:
        result = stages.pretrain_masked(items, init=args.init, out=args.out, config=config,
                                        metadata=meta)
    return INTERRUPTED if result.status == "interrupted" else 0


def cmd_finetune(args: argparse.Namespace) -> int:
    """One fine-tuning run: task x rotation x initialization x label fraction."""
    from medtx import stages
    from medtx.folds import read_manifest
    from medtx.volumes import cache_paths

    config = _json(args.config, "--config")
    manifest = read_manifest(args.manifest)

    def image(row):
        return cache_paths(args.cache_dir, row["dataset"], row["scan"])["image"]

    def regions(row):
        if args.task != "segmentation":
            return None
        return cache_paths(args.cache_dir, row["dataset"], row["scan"])["regions"]

    kw = {"rotation": args.rotation, "cache_dir_fn": image, "seg_fn": regions}
    sidecar = Path(args.manifest).with_suffix(".json")
    result = stages.finetune(
        args.task,
        stages.manifest_items(manifest, role="train", fraction=args.fraction, **kw),
        stages.manifest_items(manifest, role="val", **kw),
        stages.manifest_items(manifest, role="test", **kw),
        init=None if args.init in (None, "none") else args.init,
        use_transformer=not args.no_transformer, out=args.out,
        predictions_out=args.predictions, metrics_out=args.metrics, config=config,
        metadata={**_json(args.metadata, "--metadata"),
                  "manifest": str(args.manifest), "rotation": args.rotation,
                  "fraction": args.fraction,
                  "folds_sidecar": json.loads(sidecar.read_text()) if sidecar.exists() else None},
    )
    return INTERRUPTED if result.status == "interrupted" else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Tables 1/3/4/5 and, per dataset, ROC and brain-age plots of the pooled folds,
    training curves, segmentation overlays (with --cache-dir), all listed in summary.md."""
    import torch

    from medtx.tables import (build_tables, figures_section, parse_run_path, plot_age,
                              plot_curves, plot_roc)

    out = Path(args.out_dir) if args.out_dir else Path(args.summary).parent
    build_tables(args.metrics, out)
    groups: dict[tuple, list[Path]] = {}
    for path in map(Path, args.metrics):
        run = parse_run_path(path)
        groups.setdefault((run.dataset, run.task, run.init, run.frac), []).append(path.parent)
    for (dataset, task, init, frac), folders in sorted(groups.items()):
        name = out / f"{dataset}_task-{task}_init-{init}_frac-{frac}"
        predictions = [f / "predictions.tsv" for f in sorted(folders)]
        if task == "classification":
            plot_roc(predictions, f"{name}_roc.png", title=f"ROC, {dataset}, {init}")
        elif task == "regression":
            plot_age(predictions, f"{name}_age.png", title=f"Brain age, {dataset}, {init}")
        elif args.cache_dir:
            _draw_segmentation(sorted(folders)[0], dataset, args.cache_dir,
                               f"{name}_overlay.png", title=f"{dataset}, {init}")
        histories = {f.name: torch.load(f / "model.pt", weights_only=True).get("history", [])
                     for f in sorted(folders)}
        plot_curves(histories, f"{name}_curves.png")
    summary = Path(args.summary) if args.summary else out / "summary.md"
    with summary.open("a") as fh:
        fh.write("\n" + figures_section(out.glob("*.png"), summary.parent) + "\n")
    return 0


def _draw_segmentation(run_dir: Path, dataset: str, cache_dir: str, out_png: str, *,
                       title: str, n_cases: int = 2) -> None:
    """Overlays for the first test cases of one fold's model (its predictions.tsv)."""
    import pandas as pd

    from medtx.tables import plot_segmentation
    from medtx.volumes import cache_paths

    scans = pd.read_csv(run_dir / "predictions.tsv", sep="\t", dtype={"scan": str})["scan"]
    cases = []
    for scan in scans[:n_cases]:
        files = cache_paths(cache_dir, dataset, scan)
        cases.append({"scan": scan, "image": files["image"], "seg": files["regions"]})
    plot_segmentation(run_dir / "model.pt", cases, out_png, title=f"{title}, {run_dir.name}")


def cmd_params(args: argparse.Namespace) -> int:
    """The paper's Table 3 for our models: parameters per task and preset."""
    from medtx.models.slice_transformer import params_table

    rows = params_table()
    if args.format == "tsv":
        print("task\tpreset\tin_channels\toutputs\tparameters\tpaper")
        for r in rows:
            print(f"{r['task']}\t{r['preset']}\t{r['in_channels']}\t{r['num_outputs']}\t"
                  f"{r['parameters']}\t{r['paper']}")
        return 0
    print(f"{'task':15} {'preset':11} {'in':>3} {'out':>4} {'parameters':>12} {'paper (Table 3)':>16}")
    for r in rows:
        print(f"{r['task']:15} {r['preset']:11} {r['in_channels']:>3} {r['num_outputs']:>4} "
              f"{r['parameters']:>12,} {r['paper']!s:>16}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from medtx.audit import main_audit

    return main_audit(args.root)


def cmd_demo(args: argparse.Namespace) -> int:
    from medtx import demo

    spec = _json(args.spec, "--spec")
    if args.what == "t1-scan":
        rows = {r["subject"]: r for r in demo.plan_t1_cohort(spec)}
        if args.subject not in rows:
            raise MedtxError(f"subject {args.subject!r} is not in the demo plan")
        demo.generate_t1_scan(rows[args.subject], spec, args.out)
    elif args.what == "t1-participants":
        demo.write_t1_participants(demo.plan_t1_cohort(spec), args.out)
    elif args.what == "brats-case":
        rows = {r["case"]: r for r in demo.plan_brats_cohort(spec)}
        if args.subject not in rows:
            raise MedtxError(f"case {args.subject!r} is not in the demo plan")
        demo.generate_brats_case(rows[args.subject], spec, args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medtx", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("preprocess", help="run the whole T1 chain on one scan")
    p.add_argument("t1", help="raw T1-weighted NIfTI")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--backend", choices=["auto", "fsl", "ants"], help="override preprocess/backend")
    p.add_argument("--config", help="config YAML (default: the repo's config.yaml)")
    p.add_argument("--scan", help="scan id used in file names (default: from the file name)")
    p.add_argument("--threads", type=int, help="ITK threads when not deterministic")
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("step", help="one preprocessing step (what the rules call)")
    p.add_argument("step", choices=["bet", "flirt", "n4", "pool_normalize", "brats"])
    p.add_argument("--input", action="append", metavar="ROLE=PATH")
    p.add_argument("--output", action="append", metavar="ROLE=PATH")
    p.add_argument("--params", help="the step's config section as JSON")
    p.add_argument("--context", help="backend, seed, threads, deterministic as JSON (and the"
                   " scan's identity, unless --scan is given)")
    p.add_argument("--scan", help="scan id (sub-<id>[_ses-<id>], or a BraTS case)")
    p.add_argument("--dataset", help="the scan's dataset, recorded in provenance")
    p.set_defaults(func=cmd_step)

    p = sub.add_parser("collect", help="merge a scan's step records and draw thumbnails")
    p.add_argument("--record", action="extend", nargs="+", required=True,
                   help="the scan's step records, in chain order")
    p.add_argument("--thumbnail", help="QC thumbnail PNG to draw from the recorded files")
    p.add_argument("--qc", help="QC thresholds as JSON")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("report", help="the cohort provenance report (HTML)")
    p.add_argument("--records", nargs="*", help="per-scan provenance JSONs or folders")
    p.add_argument("--scan-table", nargs="*", help="scan tables, for the exclusions")
    p.add_argument("--settings", help="preprocess settings as JSON (for the methods text)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("folds", help="write one dataset x task fold manifest")
    p.add_argument("--dataset", required=True)
    p.add_argument("--task", required=True, choices=["classification", "regression", "segmentation"])
    p.add_argument("--table", required=True, help="the dataset's scan table (TSV)")
    p.add_argument("--records", nargs="*", help="per-scan provenance JSONs (QC and paths)")
    p.add_argument("--overrides", help="TSV: scan, action (include|exclude), reason")
    p.add_argument("--params", required=True, help="the config's folds section as JSON")
    p.add_argument("--out-tsv", required=True)
    p.add_argument("--out-json", required=True)
    p.set_defaults(func=cmd_folds)

    p = sub.add_parser("firewall", help="stop if a subject leaks between splits or stages")
    p.add_argument("--manifest", nargs="+", required=True)
    p.add_argument("--pretrain-table", nargs="*", help="scan tables of pre-training datasets")
    p.add_argument("--identities", help="person -> [dataset:subject, ...] as JSON")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_firewall)

    p = sub.add_parser("pretrain", help="stage 1 (exemplar) or 2 (masked encodings) pre-training")
    p.add_argument("stage", choices=["exemplar", "masked"])
    p.add_argument("--images", nargs="+", required=True, help="cached .npy volumes")
    p.add_argument("--init", help="stage-1 checkpoint (masked stage)")
    p.add_argument("--config", help="stage config (medtx.stages.DEFAULTS keys) as JSON")
    p.add_argument("--metadata", help="stored in the checkpoint (preprocessing hash) as JSON")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("finetune", help="fine-tune one task x fold x init x fraction")
    p.add_argument("--task", required=True, choices=["classification", "regression", "segmentation"])
    p.add_argument("--manifest", required=True)
    p.add_argument("--rotation", type=int, required=True, help="k: test fold k, val fold k+1")
    p.add_argument("--fraction", type=int, default=100, help="label fraction in percent")
    p.add_argument("--init", help="pre-trained checkpoint, or none for scratch")
    p.add_argument("--no-transformer", action="store_true", help="the w/o-transformer ablation")
    p.add_argument("--cache-dir", required=True, help="folder of <dataset>/<scan>.npy caches")
    p.add_argument("--config", help="stage config as JSON")
    p.add_argument("--metadata", help="stored in the checkpoint (preprocessing hash) as JSON")
    p.add_argument("--out", required=True, help="final checkpoint (.pt)")
    p.add_argument("--predictions", required=True)
    p.add_argument("--metrics", required=True)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="tables like the paper's from fine-tuning metrics")
    p.add_argument("--metrics", nargs="+", required=True)
    p.add_argument("--cache-dir", help="folder of <dataset>/<scan>.npy caches: draws "
                   "segmentation overlays of a few test cases")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out-dir", help="folder for the tables and plots")
    where.add_argument("--summary", help="the summary.md to write (tables go beside it)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("params", help="print Table 3: parameters of our models")
    p.add_argument("--format", choices=["text", "tsv"], default="text")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("audit", help="re-hash recorded outputs; exit 1 if any changed or vanished")
    p.add_argument("root", nargs="?", default="results")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("demo", help="write part of the synthetic demo cohort")
    p.add_argument("what", choices=["t1-scan", "t1-participants", "brats-case"])
    p.add_argument("--spec", required=True, help="the dataset's generate section as JSON")
    p.add_argument("--subject", help="subject (t1-scan) or case (brats-case)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MedtxError as err:
        message = str(err)
        print(f"medtx: error: {message}", file=sys.stderr)
        if "\n" in message:  # a list of problems: end on one summary line
            print(f"medtx: error: {message.splitlines()[0].rstrip(':')} (listed above)",
                  file=sys.stderr)
        return 1
    except Exception as err:  # a library failure on input that passed our checks
        import traceback

        traceback.print_exc()
        where = f" ({args.command} {getattr(args, 'step', '') or ''})".replace(" )", ")")
        print(f"medtx: error{where}: unexpected {type(err).__name__}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
