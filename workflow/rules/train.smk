# Training: an index of each dataset's float16 caches (written by the rules
# pool_normalize and brats_preprocess), stage 1 (exemplar) and stage 2 (masked
# encodings) pre-training, fine-tuning per task x fold x init x label
# fraction, and the paper's tables. Every training rule waits for the leakage
# firewall (firewall_gate), so a leak stops the run before any training job.


localrules:
    cache_index,


rule cache_index:
    input:
        unpack(dataset_caches),
    output:
        cache_index("{dataset}"),
    log:
        f"{LOGS}/train/cache_index/{{dataset}}.log",
    params:
        scans=lambda w: list(OK[w.dataset]["scan"]),
        code=code_hash("cache_index"),
    run:
        from medtx.data.cache import write_cache_index

        write_cache_index(
            wildcards.dataset,
            params.scans,
            input.images,
            output[0],
            input.get("regions"),
            brats=is_brats(wildcards.dataset),
        )


rule pretrain_exemplar:
    input:
        firewall=firewall_gate(),
        indexes=pretrain_indexes(),
    output:
        paths.pretrain_checkpoint(RESULTS, "exemplar"),
    log:
        f"{LOGS}/train/pretrain_exemplar.log",
    conda:
        ENV
    threads: train_threads("pretrain")
    resources:
        **train_resources("pretrain", mem_mb=8000, runtime=600),
    params:
        config=as_json(stage_config("pretrain")),
        meta=train_metadata(),
        code=code_hash("pretrain"),
    shell:
        f"OMP_WAIT_POLICY=PASSIVE {TRAIN_LAUNCH} -m medtx pretrain exemplar"
        " --index {input.indexes:q}"
        " --config {params.config:q} --metadata {params.meta:q} --out {output:q} > {log:q} 2>&1"


rule pretrain_masked:
    input:
        firewall=firewall_gate(),
        init=paths.pretrain_checkpoint(RESULTS, "exemplar"),
        indexes=pretrain_indexes(),
    output:
        paths.pretrain_checkpoint(RESULTS, "masked"),
    log:
        f"{LOGS}/train/pretrain_masked.log",
    conda:
        ENV
    threads: train_threads("pretrain")
    resources:
        **train_resources("pretrain", mem_mb=8000, runtime=600),
    params:
        config=as_json(stage_config("pretrain")),
        meta=train_metadata(),
        code=code_hash("pretrain"),
    shell:
        f"OMP_WAIT_POLICY=PASSIVE {TRAIN_LAUNCH} -m medtx pretrain masked"
        " --index {input.indexes:q}"
        " --init {input.init:q} --config {params.config:q} --metadata {params.meta:q}"
        " --out {output:q} > {log:q} 2>&1"


rule finetune:
    input:
        unpack(finetune_inputs),
    output:
        model=f"{FINETUNE}/model.pt",
        predictions=f"{FINETUNE}/predictions.tsv",
        metrics=f"{FINETUNE}/metrics.json",
    log:
        f"{LOGS}/train/finetune/{{dataset}}/task-{{task}}/init-{{init}}_frac-{{frac}}/fold-{{fold}}.log",
    wildcard_constraints:
        task=one_of(TASKS),
        init=one_of(INITS),
        frac="[0-9]+",
        fold="[0-9]+",
    conda:
        ENV
    threads: train_threads("finetune")
    resources:
        **train_resources("finetune", mem_mb=12000, runtime=1440),
    params:
        config=as_json(stage_config("finetune")),
        meta=lambda w: train_metadata(w.dataset),
        init=lambda w, input: shell_args("--init-checkpoint", input.get("init", [])),
        code=code_hash("finetune"),
    shell:
        f"OMP_WAIT_POLICY=PASSIVE {TRAIN_LAUNCH} -m medtx finetune"
        " --dataset {wildcards.dataset:q}"
        " --task {wildcards.task:q} --init {wildcards.init:q} --fraction {wildcards.frac:q}"
        " --fold {wildcards.fold:q} --manifest {input.manifest:q} --cache-index {input.cache_index:q}"
        " {params.init}"
        " --config {params.config:q} --metadata {params.meta:q}"
        " --out {output.model:q} --predictions {output.predictions:q}"
        " --metrics {output.metrics:q} > {log:q} 2>&1"


rule evaluate:
    input:
        metrics=finetune_targets("metrics.json"),
    output:
        table1=f"{paths.tables_dir(RESULTS)}/table1.md",
        summary=f"{paths.tables_dir(RESULTS)}/summary.md",
    log:
        f"{LOGS}/train/evaluate.log",
    conda:
        ENV
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=code_hash("evaluate"),
    shell:
        "python -m medtx evaluate --metrics {input.metrics:q}"
        " --summary {output.summary:q} > {log:q} 2>&1"
