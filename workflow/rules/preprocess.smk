# T1 chain: bet -> flirt -> n4 -> pool -> normalize -> collect. By default
# (preprocess/job_per: scan) one job per scan runs them all in one process: a
# scan pays Python's and antspyx's start-up once, and Snakemake plans one job per
# scan instead of five. Inside the job a step is skipped while its record shows
# the same inputs, settings and code; after a step that runs, all later steps
# run (medtx.preprocess.steps). With job_per: step each step is its own job
# (for debugging one step); both write the same files and records.
# Each rule's params hold exactly its config sections plus the hash of the
# code it runs, so a change reruns that step and what follows, nothing else.

if PRE["job_per"] == "scan":

    rule preprocess_t1:
        input:
            t1=raw_t1,
        output:
            provenance=T1["provenance"],
            qc_png=report(T1["qc_png"], **QC_STRIP),
        log:
            f"{LOGS}/preprocess/preprocess_t1/{{dataset}}/{{scan}}.log",
        wildcard_constraints:
            dataset=one_of(t1_datasets()),  # the cache path is shared with brats_preprocess
        conda:
            ENV
        threads: PRE["threads"]
        resources:
            mem_mb=4000,  # the largest step's (flirt, n4)
            runtime=90,  # the steps' sum
        params:
            steps=CHAIN_PARAMS,
            context=STEP_CONTEXT,
            code=code_hash("chain"),
        shell:
            # the chain names its other files from the provenance record's folder,
            # and the training cache from the cache folder
            "python -m medtx step chain --input t1={input.t1:q}"
            " --output provenance={output.provenance:q} "
            + literal_args(
                output=f"cache_dir={paths.cache_dir(RESULTS)}",
                params=CHAIN_PARAMS,
                context=STEP_CONTEXT,
            )
            + " --scan {wildcards.scan:q} --dataset {wildcards.dataset:q} > {log:q} 2>&1"

else:

    rule bet:
        input:
            t1=raw_t1,
        output:
            **bet_outputs(),
        log:
            f"{LOGS}/preprocess/bet/{{dataset}}/{{scan}}.log",
        conda:
            ENV
        threads: PRE["threads"]
        resources:
            mem_mb=3000,
            runtime=20,
        params:
            bet=as_json({BACKEND: PRE["bet"][BACKEND]}),
            context=STEP_CONTEXT,
            code=code_hash("bet"),
        shell:
            "python -m medtx step bet --input t1={input.t1:q} "
            + io_args("output", bet_outputs())
            + " --params {params.bet:q} --context {params.context:q}"
            " --scan {wildcards.scan:q} --dataset {wildcards.dataset:q} > {log:q} 2>&1"

    rule flirt:
        input:
            **flirt_inputs(),
        output:
            brain=T1["flirt_brain"],
            mask=T1["flirt_mask"],
            xfm=T1["transform"],
            record=T1["flirt_record"],
        log:
            f"{LOGS}/preprocess/flirt/{{dataset}}/{{scan}}.log",
        conda:
            ENV
        threads: PRE["threads"]
        resources:
            mem_mb=4000,
            runtime=30,
        params:
            flirt=as_json({BACKEND: PRE["flirt"][BACKEND]}),
            context=STEP_CONTEXT,
            code=code_hash("flirt"),
        shell:
            "python -m medtx step flirt --input brain={input.brain:q} --input mask={input.mask:q}"
            + (
                " --input xfm_init={input.xfm_init:q} --input t1={input.t1:q}"
                if BACKEND == "ants"
                else ""
            )
            + " --output brain={output.brain:q} --output mask={output.mask:q}"
            " --output xfm={output.xfm:q} --output record={output.record:q}"
            " --params {params.flirt:q} --context {params.context:q}"
            " --scan {wildcards.scan:q} --dataset {wildcards.dataset:q} > {log:q} 2>&1"

    rule n4_correct:
        input:
            brain=T1["flirt_brain"],
            mask=T1["flirt_mask"],
        output:
            n4=T1["n4"],
            record=T1["n4_record"],
        log:
            f"{LOGS}/preprocess/n4_correct/{{dataset}}/{{scan}}.log",
        conda:
            ENV
        threads: PRE["threads"]
        resources:
            mem_mb=4000,
            runtime=30,
        params:
            n4=as_json(PRE["n4"]),
            context=STEP_CONTEXT,
            code=code_hash("n4"),
        shell:
            "python -m medtx step n4 --input brain={input.brain:q} --input mask={input.mask:q}"
            " --output n4={output.n4:q} --output record={output.record:q}"
            " --params {params.n4:q} --context {params.context:q}"
            " --scan {wildcards.scan:q} --dataset {wildcards.dataset:q} > {log:q} 2>&1"

    rule pool_normalize:
        input:
            image=T1["n4"],
            mask=T1["flirt_mask"],
        output:
            pooled=T1["pooled"],
            mask=T1["brain_mask"],
            pool_record=T1["pool_record"],
            image=T1["preproc"],
            cache=cache_files("{dataset}", "{scan}")["image"],
            record=T1["normalize_record"],
        log:
            f"{LOGS}/preprocess/pool_normalize/{{dataset}}/{{scan}}.log",
        wildcard_constraints:
            dataset=one_of(t1_datasets()),  # the cache path is shared with brats_preprocess
        conda:
            ENV
        resources:
            mem_mb=2000,
            runtime=5,
        params:
            settings=as_json(
                {
                    "pool": PRE["pool"],
                    "normalize": PRE["normalize"],
                    "face_margin_mm": config["qc"]["face_margin_mm"],
                }
            ),
            context=STEP_CONTEXT,
            code=code_hash("pool_normalize"),
        shell:
            "python -m medtx step pool_normalize --input image={input.image:q} --input mask={input.mask:q}"
            " --output pooled={output.pooled:q} --output mask={output.mask:q}"
            " --output pool_record={output.pool_record:q} --output image={output.image:q}"
            " --output cache={output.cache:q} --output record={output.record:q}"
            " --params {params.settings:q} --context {params.context:q}"
            " --scan {wildcards.scan:q} --dataset {wildcards.dataset:q} > {log:q} 2>&1"

    rule collect_provenance:
        input:
            records=step_records(T1),
        output:
            provenance=T1["provenance"],
            thumbnail=report(T1["qc_png"], **QC_STRIP),
        log:
            f"{LOGS}/preprocess/collect_provenance/{{dataset}}/{{scan}}.log",
        wildcard_constraints:
            dataset=one_of(t1_datasets()),
        conda:
            ENV
        resources:
            mem_mb=2000,
            runtime=5,
        params:
            qc=as_json(config["qc"]),
            code=code_hash("collect"),
        shell:
            "python -m medtx collect --record {input.records:q} --thumbnail {output.thumbnail:q}"
            " --qc {params.qc:q} --out {output.provenance:q} > {log:q} 2>&1"


# A dataset's provenance records, one path per line: the rules below and after
# (derivatives, report, folds, cache index, predictions) depend on this one file
# instead of every record, so Snakemake plans one edge per scan, not one per
# scan and consuming rule, and no command line grows with the cohort.


localrules:
    record_list,


rule record_list:
    input:
        records=lambda w: dataset_targets(w.dataset, "provenance"),
    output:
        record_list("{dataset}"),
    log:
        f"{LOGS}/preprocess/record_list/{{dataset}}.log",
    params:
        code=code_hash("record_list"),
    run:
        from medtx.workflow.argfile import write_argfile

        write_argfile(input.records, output[0])


# A T1 dataset's final images as a BIDS-derivatives dataset (linked, not copied):
# seconds of bookkeeping, run where Snakemake runs rather than queued on a cluster.


localrules:
    bids_derivatives,


rule bids_derivatives:
    input:
        records=lambda w: record_list(w.dataset),
        table=paths.scan_table(RESULTS, "{dataset}"),
    output:
        directory(paths.derivatives(RESULTS, "{dataset}")),
    log:
        f"{LOGS}/preprocess/bids_derivatives/{{dataset}}.log",
    wildcard_constraints:
        dataset=one_of(t1_datasets()),
    conda:
        ENV
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        source=lambda w: bids_root(w.dataset),
        settings=as_json(output_settings(PRE)),
        code=code_hash("derivatives"),
    shell:
        "python -m medtx derivatives --dataset {wildcards.dataset:q} --scan-table {input.table:q}"
        " --records @{input.records:q} --source {params.source:q} --settings {params.settings:q}"
        " --code {params.code:q} --out {output:q} > {log:q} 2>&1"


# BraTS: already skull-stripped and co-registered; crop, normalize, check labels.


rule brats_preprocess:
    input:
        unpack(brats_inputs),
    output:
        image=BRATS["image"],
        seg=BRATS["seg"],
        cache=cache_files("{dataset}", "{scan}")["image"],
        regions=cache_files("{dataset}", "{scan}")["regions"],
        record=BRATS["record"],
    log:
        f"{LOGS}/preprocess/brats_preprocess/{{dataset}}/{{scan}}.log",
    wildcard_constraints:
        dataset=one_of(brats_datasets()),
    conda:
        ENV
    resources:
        mem_mb=3000,
        runtime=10,
    params:
        brats=as_json(PRE["brats"]),
        context=STEP_CONTEXT,
        code=code_hash("brats"),
    shell:
        "python -m medtx step brats "
        + io_args("input", brats_roles())
        + " --output image={output.image:q} --output seg={output.seg:q}"
        " --output cache={output.cache:q} --output regions={output.regions:q}"
        " --output record={output.record:q} --params {params.brats:q} --context {params.context:q}"
        " --scan {wildcards.scan:q} --dataset {wildcards.dataset:q} > {log:q} 2>&1"


rule collect_brats:
    input:
        record=BRATS["record"],
    output:
        provenance=BRATS["provenance"],
        thumbnail=report(BRATS["qc_png"], **QC_STRIP),
    log:
        f"{LOGS}/preprocess/collect_brats/{{dataset}}/{{scan}}.log",
    wildcard_constraints:
        dataset=one_of(brats_datasets()),
    conda:
        ENV
    resources:
        mem_mb=2000,
        runtime=5,
    params:
        qc=as_json(config["qc"]),
        code=code_hash("collect"),
    shell:
        "python -m medtx collect --record {input.record:q} --thumbnail {output.thumbnail:q}"
        " --qc {params.qc:q} --out {output.provenance:q} > {log:q} 2>&1"
