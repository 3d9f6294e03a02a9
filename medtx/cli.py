"""The ``medtx`` command: what Snakemake rules call, and tools for users.

    medtx preprocess T1.nii.gz --out DIR [--backend auto|fsl|ants] [--config FILE] [--allow-qc-fail]
    medtx deface T1 OUT --mask MASK [--record JSON]
    medtx export {RUN_DIR | CHECKPOINT} --out DIR [--config FILE]
    medtx predict BUNDLE INPUT ... --out DIR [--device cpu|cuda] [--batch-size N]
    medtx predict BUNDLE --cache-index TSV --records JSON ... --scan-table TSV --out DIR
    medtx step {bet,flirt,n4,pool_normalize,brats,chain} --input ROLE=PATH ... --output ROLE=PATH
    medtx collect --record FILE ... --out FILE [--thumbnail PNG] [--qc JSON]
    medtx report --records JSON|DIR ... [--scan-table TSV ...] [--settings JSON] --out HTML
    medtx derivatives --dataset D --scan-table TSV --records JSON ... --settings JSON ...
    medtx folds --dataset D --task T --table TSV --records JSON ... --params JSON ...
    medtx firewall --manifest TSV ... --pretrain-table TSV ... [--bundle DIR ...] --out JSON
    medtx pretrain {exemplar,masked,tokenizer,mim} --index TSV ... --out PT [--init PT] ...
    medtx finetune --dataset D --task T [--backbone B] --init I --fraction P --fold K ...
    medtx evaluate --metrics JSON ... [--pretrain PT ...] [--scan-tables TSV ...] --out-dir DIR
    medtx params [--format text|tsv]
    medtx audit [ROOT] [--base DIR]
    medtx demo {t1-scan,t1-participants,brats-case} --spec JSON ...

A user error (bad scan, bad config, missing FSL) prints one line,
``medtx: error: ...``, as the log's last line and exits 1; no traceback.
``medtx preprocess`` exits 4 (``QC_FAILED``) when the scan fails QC: it still
prints its files and verdict, and names the failed checks in one line
(``--allow-qc-fail`` exits 0). ``medtx predict`` exits 5 (``SOME_SKIPPED``) when
some inputs could not be predicted (each named in the table's ``error`` column)
and the others were.

This module only parses arguments and calls one library function per command:
the rules' shell lines (which Snakemake's code trigger sees) and those
functions' code hashes cover everything a job computes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from medtx.domain import BACKBONES, DEFAULT_BACKBONE, INITS, PRETRAIN_STAGES, TASKS
from medtx.errors import MedtxError
from medtx.workflow.argfile import PREFIX


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


QC_FAILED = 4  # exit code of `medtx preprocess` on a scan that fails QC
SOME_SKIPPED = 5  # exit code of `medtx predict` when some inputs could not be predicted


def cmd_preprocess(args: argparse.Namespace) -> int:
    from medtx.config import load_config
    from medtx.preprocess.chain import preprocess_scan

    out = preprocess_scan(
        args.t1,
        args.out,
        config=load_config(args.config),
        backend=args.backend,
        scan=args.scan,
        threads=args.threads,
    )
    print(json.dumps(out, indent=2))
    if out["qc"]["passed"] or args.allow_qc_fail:
        return 0
    failed = "; ".join(out["qc"]["failures"])
    print(f"medtx: QC failed: {failed} (see {out['provenance']})", file=sys.stderr)
    return QC_FAILED


# The preprocessing steps a rule can run. Each step's module is its code-hash
# entry (medtx.workflow.codehash.STAGE_ENTRIES), and its run_step(inputs,
# outputs, params, ctx) maps the rule's files to the step's function; chain
# runs a scan's whole T1 chain in one job (medtx.preprocess.chain).
STEPS = ("bet", "flirt", "n4", "pool_normalize", "brats", "chain")


def cmd_step(args: argparse.Namespace) -> int:
    from medtx.config import step_params
    from medtx.preprocess.context import step_context

    inputs, outputs = _pairs(args.input, "--input"), _pairs(args.output, "--output")
    params = step_params(args.step, _json(args.params, "--params"))
    ctx = step_context(
        _json(args.context, "--context"),
        scan=args.scan,
        dataset=args.dataset,
        brats=args.step == "brats",
    )
    if args.step == "chain":
        from medtx.preprocess.chain import run_step as run_chain_step

        run_chain_step(inputs, outputs, params, ctx)
    else:
        from medtx.preprocess.steps import run_step

        run_step(args.step, inputs, outputs, params, ctx)
    return 0


def cmd_collect(args: argparse.Namespace) -> int:
    from medtx.provenance.collect import collect_scan

    collect_scan(args.record, args.out, thumbnail=args.thumbnail, qc=_json(args.qc, "--qc"))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from medtx.provenance.report import write_report

    write_report(
        args.records or [], args.scan_table or [], _json(args.settings, "--settings"), args.out
    )
    return 0


def cmd_derivatives(args: argparse.Namespace) -> int:
    from medtx.preprocess.derivatives import build_derivatives, pool_factor

    build_derivatives(
        args.dataset,
        args.records,
        args.scan_table,
        args.out,
        source_root=args.source or None,
        factor=pool_factor(_json(args.settings, "--settings")),
        code=args.code,
    )
    return 0


def cmd_folds(args: argparse.Namespace) -> int:
    from medtx.folds.manifest import manifest_from_files

    manifest_from_files(
        dataset=args.dataset,
        task=args.task,
        table=args.table,
        records=args.records or [],
        params=_json(args.params, "--params"),
        out_tsv=args.out_tsv,
        out_json=args.out_json,
        overrides=args.overrides,
    )
    return 0


def cmd_firewall(args: argparse.Namespace) -> int:
    from medtx.folds.firewall import run_firewall

    run_firewall(
        args.manifest,
        args.pretrain_table or [],
        _json(args.identities, "--identities"),
        args.out,
        bundles=args.bundle,
    )
    return 0


INTERRUPTED = 3  # exit code of a training job stopped at a checkpoint (rerun resumes)


def cmd_pretrain(args: argparse.Namespace) -> int:
    import importlib

    from medtx.models.registry import backbone
    from medtx.train.pretraining import pretrain_stage

    name = next(b for b, stages in PRETRAIN_STAGES.items() if args.stage in stages)
    stages = importlib.import_module(backbone(name).pretraining).STAGES
    result = pretrain_stage(
        stages,
        args.stage,
        args.index,
        init=args.init,
        out=args.out,
        config=_json(args.config, "--config"),
        metadata=_json(args.metadata, "--metadata"),
    )
    return INTERRUPTED if result.status == "interrupted" else 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from medtx.domain import RunId
    from medtx.train.finetune import finetune_fold

    try:
        run = RunId(args.dataset, args.task, args.init, args.fraction, args.fold, args.backbone)
    except ValueError as err:
        raise MedtxError(f"finetune: {err}") from err
    result = finetune_fold(
        run,
        manifest=args.manifest,
        cache_index=args.cache_index,
        init_checkpoint=args.init_checkpoint,
        out=args.out,
        predictions_out=args.predictions,
        metrics_out=args.metrics,
        config=_json(args.config, "--config"),
        metadata=_json(args.metadata, "--metadata"),
    )
    return INTERRUPTED if result.status == "interrupted" else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from medtx.evaluate.summary import evaluate_runs

    out = args.out_dir or str(Path(args.summary).parent)
    evaluate_runs(
        args.metrics,
        out,
        summary=args.summary,
        pretrain=args.pretrain or [],
        attributes=args.scan_tables or [],
        subgroup_config=_json(args.subgroups, "--subgroups") if args.subgroups else None,
    )
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    from medtx.models.pumit import model as pumit
    from medtx.models.slice_transformer import format_params_table, params_table

    rows = [{**r, "backbone": "medical_transformer"} for r in params_table()]
    rows += [{**r, "backbone": "pumit"} for r in pumit.params_table()]
    # PUMIT base's ViT alone: ours, and in "paper" the authors' code's count
    rows += [{**r, "backbone": "pumit"} for r in pumit.vit_params_rows("base")]
    print(format_params_table(rows, args.format))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from medtx.provenance.audit import main_audit

    return main_audit(args.root, base=args.base)


def cmd_demo(args: argparse.Namespace) -> int:
    from medtx.data.demo import write_demo_part

    write_demo_part(args.what, _json(args.spec, "--spec"), args.out, subject=args.subject)
    return 0


def cmd_deface(args: argparse.Namespace) -> int:
    from medtx.share.deface import deface

    qc = _json(args.qc, "--qc") if args.qc else None
    record = deface(args.t1, args.mask, args.out, record_out=args.record, qc=qc, scan=args.scan)
    if record["qc"]["passed"]:
        return 0
    if record.get("refused"):  # no copy written: its front and top could not be told
        print(f"medtx: {record['refused']}", file=sys.stderr)
        return QC_FAILED
    failed = "; ".join(
        f"{c['metric']}={c['value']:.4g} (max {c['max']})"
        for c in record["qc"]["checks"]
        if not c["passed"]
    )
    print(
        f"medtx: the defaced copy {args.out} still fails the face check: {failed}", file=sys.stderr
    )
    return QC_FAILED


def cmd_export(args: argparse.Namespace) -> int:
    from medtx.bundle import MANIFEST
    from medtx.config import load_config
    from medtx.share.export import export_bundle, export_encoder

    config = load_config(args.config)
    if Path(args.source).is_file():
        bundle = export_encoder(args.source, args.out, config=config)
        meta = bundle.meta
        what = (
            f"{meta['backbone']} encoder ({meta['stage']}), "
            f"{meta['training']['n_subjects']} pre-training subjects"
        )
    else:
        bundle = export_bundle(args.source, args.out, config=config)
        meta = bundle.meta
        what = f"{meta['backbone']} {meta['task']}, folds " + ", ".join(
            str(f["fold"]) for f in meta["folds"]
        )
    size = "x".join(map(str, meta["input"]["shape"]))
    print(f"medtx: bundle {bundle.path}: {what}, input {size}; files checked by {MANIFEST}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from medtx.predict.run import PREDICTIONS, predict_bundle, predict_cached

    run = {"device": args.device, "batch_size": args.batch_size}
    if args.cache_index:  # the workflow's rule: its own caches and records
        if args.inputs or not (args.records and args.scan_table):
            raise MedtxError("--cache-index takes --records and --scan-table, and no INPUT")
        table = predict_cached(
            args.bundle, args.cache_index, args.records, args.scan_table, args.out, **run
        )
    elif not args.inputs:
        raise MedtxError("give the scans to predict: NIfTI files, BIDS folders or CSV/TSV tables")
    else:
        table = predict_bundle(args.bundle, args.inputs, args.out, **run)
    sys.stdout.write(table.to_csv(sep="\t", index=False, float_format="%.6g"))
    print(f"medtx: {len(table)} scan(s) -> {Path(args.out) / PREDICTIONS}", file=sys.stderr)
    skipped = int(table["error"].notna().sum()) if "error" in table else 0
    if skipped and not args.cache_index:  # the workflow's rule keeps its outputs: exit 0
        print(f"medtx: {skipped} scan(s) skipped: see the error column", file=sys.stderr)
        return SOME_SKIPPED
    return 0


# One example per command, shown by `medtx <command> --help`.
EXAMPLES = {
    "preprocess": "medtx preprocess sub-01_T1w.nii.gz --out out/sub-01",
    "deface": "medtx deface sub-01_T1w.nii.gz sub-01_desc-defaced_T1w.nii.gz"
    " --mask sub-01_desc-brain_mask.nii.gz --record deface.json",
    "export": "medtx export results/finetune/demo_adni/task-regression/"
    "backbone-medical_transformer/init-pretrained_frac-100 --out bundles/brain-age",
    "predict": "medtx predict bundles/brain-age scans.csv --out predictions/brain-age",
    "step": "medtx step n4 --input image=brain.nii.gz --input mask=mask.nii.gz"
    " --output n4=n4.nii.gz --output record=n4.json --scan sub-01",
    "collect": "medtx collect --record sub-01_step-*.json --out sub-01_provenance.json",
    "report": "medtx report --records results/work --scan-table results/scans/*.tsv"
    " --out results/reports/provenance/index.html",
    "derivatives": "medtx derivatives --dataset adni --scan-table results/scans/adni.tsv"
    " --records results/work/adni/*/*_provenance.json"
    ' --source data/adni --settings \'{"pool": {"factor": 2}}\' --code abc123'
    " --out results/preprocess/adni",
    "folds": "medtx folds --dataset adni --task regression --table results/scans/adni.tsv"
    " --records results/work/adni/*/*_provenance.json --params '{\"n_folds\": 5}'"
    " --out-tsv folds.tsv --out-json folds.json",
    "firewall": "medtx firewall --manifest results/folds/*_folds.tsv"
    " --pretrain-table results/scans/ixi.tsv --out firewall.json",
    "pretrain": "medtx pretrain exemplar --index results/cache/ixi.index.tsv --out stage-1.pt",
    "finetune": "medtx finetune --dataset adni --task regression --init scratch --fold 0"
    " --manifest folds.tsv --cache-index results/cache/adni.index.tsv --out model.pt"
    " --predictions predictions.tsv --metrics metrics.json",
    "evaluate": "medtx evaluate --metrics results/finetune/*/*/*/*/*/metrics.json"
    " --out-dir results/tables",
    "params": "medtx params --format tsv",
    "audit": "medtx audit results",
    "demo": "medtx demo brats-case --spec '{\"n_cases\": 1}' --subject BraTS20_Training_001"
    " --out demo/brats",
}


def cmd_version(args: argparse.Namespace) -> int:
    from medtx import __version__
    from medtx.workflow.codehash import package_hash

    print(f"medtx {__version__} (code {package_hash()})")
    return 0


def _preprocess_parser(sub: Any) -> None:
    p = sub.add_parser("preprocess", help="run the whole T1 chain on one scan")
    p.add_argument("t1", help="raw T1-weighted NIfTI")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--backend", choices=["auto", "fsl", "ants"], help="override preprocess/backend")
    p.add_argument("--config", help="config YAML (default: the repo's config.yaml)")
    p.add_argument("--scan", help="scan id used in file names (default: from the file name)")
    p.add_argument("--threads", type=int, help="ITK threads when not deterministic")
    p.add_argument(
        "--allow-qc-fail",
        action="store_true",
        help=f"exit 0 when the scan fails QC (default: exit {QC_FAILED})",
    )
    p.set_defaults(func=cmd_preprocess)


def _deface_parser(sub: Any) -> None:
    p = sub.add_parser("deface", help="a defaced native-space T1 for sharing (quickshear)")
    p.add_argument("t1", help="native-space T1-weighted NIfTI")
    p.add_argument("out", help="the defaced copy (.nii.gz); never the input")
    p.add_argument("--mask", required=True, help="its brain mask (the bet step's desc-brain_mask)")
    p.add_argument("--record", help="where to write the provenance record (JSON)")
    p.add_argument("--qc", help="the config's qc section as JSON (face_* keys)")
    p.add_argument("--scan", help="the scan id for the record")
    p.set_defaults(func=cmd_deface)


def _export_parser(sub: Any) -> None:
    p = sub.add_parser(
        "export", help="a fine-tuned fold ensemble or a pre-trained encoder as a bundle"
    )
    p.add_argument(
        "source",
        help="a fine-tuning run folder above fold-*/ (results/finetune/.../init-I_frac-P), "
        "or a pre-training checkpoint (results/pretrain/stage-masked.pt, stage-mim.pt)",
    )
    p.add_argument("--out", required=True, help="the bundle folder (new or empty)")
    p.add_argument("--config", help="the study's config YAML (default: the repo's config.yaml)")
    p.set_defaults(func=cmd_export)


def _predict_parser(sub: Any) -> None:
    p = sub.add_parser("predict", help="a bundle's fold ensemble on new raw scans")
    p.add_argument("bundle", help="a bundle folder (medtx export)")
    p.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="raw T1 NIfTI files, BIDS folders or CSV/TSV tables (subject, t1[, age]); "
        "BraTS case folders for a segmentation bundle",
    )
    p.add_argument(
        "--out", required=True, help="output folder (predictions.tsv, one folder per scan)"
    )
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=2, help="scans per forward pass (default 2)")
    p.add_argument("--cache-index", help="the workflow's rule: a dataset's cache index TSV")
    p.add_argument("--records", nargs="+", help="with --cache-index: the scans' provenance JSONs")
    p.add_argument("--scan-table", help="with --cache-index: the dataset's scan table (ages)")
    p.set_defaults(func=cmd_predict)


def _step_parser(sub: Any) -> None:
    p = sub.add_parser("step", help="one preprocessing step (what the rules call)")
    p.add_argument("step", choices=STEPS)
    p.add_argument("--input", action="append", metavar="ROLE=PATH")
    p.add_argument("--output", action="append", metavar="ROLE=PATH")
    p.add_argument("--params", help="the step's config section as JSON")
    p.add_argument(
        "--context",
        help="backend, seed, threads, deterministic as JSON (and the"
        " scan's identity, unless --scan is given)",
    )
    p.add_argument("--scan", help="scan id (sub-<id>[_ses-<id>], or a BraTS case)")
    p.add_argument("--dataset", help="the scan's dataset, recorded in provenance")
    p.set_defaults(func=cmd_step)


def _collect_parser(sub: Any) -> None:
    p = sub.add_parser("collect", help="merge a scan's step records and draw thumbnails")
    p.add_argument(
        "--record",
        action="extend",
        nargs="+",
        required=True,
        help="the scan's step records, in chain order",
    )
    p.add_argument("--thumbnail", help="QC thumbnail PNG to draw from the recorded files")
    p.add_argument("--qc", help="QC thresholds as JSON")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_collect)


def _report_parser(sub: Any) -> None:
    p = sub.add_parser("report", help="the cohort provenance report (HTML)")
    p.add_argument("--records", nargs="*", help="per-scan provenance JSONs or folders")
    p.add_argument("--scan-table", nargs="*", help="scan tables, for the exclusions")
    p.add_argument("--settings", help="preprocess settings as JSON (for the methods text)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_report)


def _derivatives_parser(sub: Any) -> None:
    p = sub.add_parser(
        "derivatives", help="a T1 dataset's preprocessed images as a BIDS-derivatives dataset"
    )
    p.add_argument("--dataset", required=True)
    p.add_argument("--scan-table", required=True, help="the dataset's checked scan table")
    p.add_argument(
        "--records", nargs="+", required=True, help="each scan's provenance record (its folder)"
    )
    p.add_argument("--source", help="the raw BIDS dataset's root (for Sources); '' for none")
    p.add_argument("--settings", required=True, help="preprocess settings as JSON")
    p.add_argument("--code", required=True, help="the chain's code hash (GeneratedBy)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_derivatives)


def _folds_parser(sub: Any) -> None:
    p = sub.add_parser("folds", help="write one dataset x task fold manifest")
    p.add_argument("--dataset", required=True)
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--table", required=True, help="the dataset's scan table (TSV)")
    p.add_argument("--records", nargs="*", help="per-scan provenance JSONs (QC and paths)")
    p.add_argument("--overrides", help="TSV: scan, action (include|exclude), reason")
    p.add_argument("--params", required=True, help="the config's folds section as JSON")
    p.add_argument("--out-tsv", required=True)
    p.add_argument("--out-json", required=True)
    p.set_defaults(func=cmd_folds)


def _firewall_parser(sub: Any) -> None:
    p = sub.add_parser("firewall", help="stop if a subject leaks between splits or stages")
    p.add_argument("--manifest", nargs="+", required=True)
    p.add_argument("--pretrain-table", nargs="*", help="scan tables of pre-training datasets")
    p.add_argument("--identities", help="person -> [dataset:subject, ...] as JSON")
    p.add_argument("--bundle", nargs="+", default=[], help="received encoder bundles")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_firewall)


def _pretrain_parser(sub: Any) -> None:
    p = sub.add_parser(
        "pretrain",
        help="a pre-training stage: exemplar, masked (Medical Transformer); tokenizer, mim (PUMIT)",
    )
    p.add_argument("stage", choices=[s for stages in PRETRAIN_STAGES.values() for s in stages])
    p.add_argument(
        "--index", nargs="+", required=True, help="cache indexes (TSV) of the pre-training datasets"
    )
    p.add_argument("--init", help="the previous stage's checkpoint (masked, mim)")
    p.add_argument("--config", help="stage config (medtx.train.config.DEFAULTS keys) as JSON")
    p.add_argument("--metadata", help="stored in the checkpoint (preprocessing hash) as JSON")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_pretrain)


def _finetune_parser(sub: Any) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune one dataset x task x backbone x init x fraction x fold"
    )
    p.add_argument("--dataset", required=True)
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--backbone", choices=BACKBONES, default=DEFAULT_BACKBONE)
    p.add_argument(
        "--init",
        required=True,
        choices=INITS,
        help="pretrained, scratch, or notransformer (the w/o-transformer ablation)",
    )
    p.add_argument("--fraction", type=int, default=100, help="label fraction in percent")
    p.add_argument("--fold", type=int, required=True, help="k: test fold k, val fold k+1")
    p.add_argument("--manifest", required=True)
    p.add_argument("--cache-index", required=True, help="the dataset's cache index (TSV)")
    p.add_argument("--init-checkpoint", help="pre-trained checkpoint (not with --init scratch)")
    p.add_argument("--config", help="stage config as JSON")
    p.add_argument("--metadata", help="stored in the checkpoint (preprocessing hash) as JSON")
    p.add_argument("--out", required=True, help="final checkpoint (.pt)")
    p.add_argument("--predictions", required=True)
    p.add_argument("--metrics", required=True)
    p.set_defaults(func=cmd_finetune)


def _evaluate_parser(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="tables like the paper's from fine-tuning metrics")
    p.add_argument("--metrics", nargs="+", required=True)
    p.add_argument(
        "--pretrain", nargs="*", help="pre-training checkpoints: their loss curves, codebook usage"
    )
    p.add_argument(
        "--scan-tables", nargs="*", help="scan tables (sex, site, age, diagnosis): subgroup metrics"
    )
    p.add_argument("--subgroups", help="subgroup settings (age_bands, min_group, ...) as JSON")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out-dir", help="folder for the tables and plots")
    where.add_argument("--summary", help="the summary.md to write (tables go beside it)")
    p.set_defaults(func=cmd_evaluate)


def _params_parser(sub: Any) -> None:
    p = sub.add_parser(
        "params",
        help="print Table 3: parameters of both backbones' models, and PUMIT base's ViT "
        "alone (task vit_only) against the authors' code's count (in the paper column)",
    )
    p.add_argument("--format", choices=["text", "tsv"], default="text")
    p.set_defaults(func=cmd_params)


def _audit_parser(sub: Any) -> None:
    p = sub.add_parser(
        "audit", help="re-derive every provenance claim: records, manifests, QC, outputs"
    )
    p.add_argument("root", nargs="?", default="results")
    p.add_argument("--base", help="folder relative paths in records are relative to")
    p.set_defaults(func=cmd_audit)


def _demo_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="write part of the synthetic demo cohort")
    p.add_argument("what", choices=["t1-scan", "t1-participants", "brats-case"])
    p.add_argument("--spec", required=True, help="the dataset's generate section as JSON")
    p.add_argument("--subject", help="subject (t1-scan) or case (brats-case)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_demo)


# The commands in the order `medtx --help` lists them.
COMMAND_PARSERS = (
    _preprocess_parser,
    _deface_parser,
    _export_parser,
    _predict_parser,
    _step_parser,
    _collect_parser,
    _report_parser,
    _derivatives_parser,
    _folds_parser,
    _firewall_parser,
    _pretrain_parser,
    _finetune_parser,
    _evaluate_parser,
    _params_parser,
    _audit_parser,
    _demo_parser,
)


def build_parser() -> argparse.ArgumentParser:
    # @FILE stands for FILE's lines, one argument each: the workflow passes a
    # dataset's record paths so (medtx.workflow.argfile)
    parser = argparse.ArgumentParser(
        prog="medtx",
        description=__doc__.split("\n\n")[0],
        epilog="An argument @FILE is read as FILE's lines, one argument per line.",
        fromfile_prefix_chars=PREFIX,
    )
    parser.add_argument(
        "--version", action="store_true", help="print the version and the code hash, then exit"
    )
    sub = parser.add_subparsers(dest="command")
    for add in COMMAND_PARSERS:
        add(sub)
    for name, command in sub.choices.items():
        command.epilog = f"example:\n  {EXAMPLES[name]}"
        command.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        return cmd_version(args)
    if not args.command:
        parser.error("give a command (medtx --help lists them)")
    try:
        return args.func(args)
    except MedtxError as err:
        message = str(err)
        print(f"medtx: error: {message}", file=sys.stderr)
        if "\n" in message:  # a list of problems: end on one summary line
            print(
                f"medtx: error: {message.splitlines()[0].rstrip(':')} (listed above)",
                file=sys.stderr,
            )
        return 1
    except Exception as err:  # a library failure on input that passed our checks
        import traceback

        traceback.print_exc()
        where = f" ({args.command} {getattr(args, 'step', '') or ''})".replace(" )", ")")
        print(f"medtx: error{where}: unexpected {type(err).__name__}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
