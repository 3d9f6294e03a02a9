# Training: an index of each dataset's float16 caches (written by the rules
# pool_normalize and brats_preprocess); pre-training per backbone (the Medical
# Transformer: stage 1 exemplar, stage 2 masked encodings; PUMIT: the soft-token
# tokenizer, then masked image modelling); fine-tuning per dataset x task x
# backbone x init x label fraction x fold, and the tables, subgroup metrics and
# model cards. Every training rule waits for the leakage
# firewall (firewall_gate), so a leak stops the run before any training job.


localrules:
    cache_index,


# The caches are written by the jobs that wrote the records (a BraTS job declares
# its cache, a T1 job only its record): a missing cache is named here, with the
# file to force (--forcerun), which rebuilds it.
rule cache_index:
    input:
        records=lambda w: record_list(w.dataset),
    output:
        cache_index("{dataset}"),
    log:
        f"{LOGS}/train/cache_index/{{dataset}}.log",
    params:
        scans=lambda w: list(OK[w.dataset]["scan"]),
        caches=lambda w: dataset_caches(w.dataset),
        code=code_hash("cache_index"),
    run:
        from medtx.data.cache import write_cache_index

        write_cache_index(
            wildcards.dataset,
            params.scans,
            params.caches["images"],
            output[0],
            params.caches.get("regions"),
            brats=is_brats(wildcards.dataset),
            record_list=input.records,
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
        **train_resources("pretrain", runtime=600, step="exemplar"),
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
        **train_resources("pretrain", runtime=600, step="masked"),
    params:
        config=as_json(stage_config("pretrain")),
        meta=train_metadata(),
        code=code_hash("pretrain"),
    shell:
        f"OMP_WAIT_POLICY=PASSIVE {TRAIN_LAUNCH} -m medtx pretrain masked"
        " --index {input.indexes:q}"
        " --init {input.init:q} --config {params.config:q} --metadata {params.meta:q}"
        " --out {output:q} > {log:q} 2>&1"


rule pretrain_tokenizer:
    input:
        firewall=firewall_gate(),
        indexes=pretrain_indexes(),
        lpips=stage_files("tokenizer", "pumit", "lpips_weights"),
    output:
        paths.pretrain_checkpoint(RESULTS, "tokenizer"),
    log:
        f"{LOGS}/train/pretrain_tokenizer.log",
    conda:
        ENV
    threads: train_threads("tokenizer", "pumit")
    resources:
        **train_resources("tokenizer", runtime=600, backbone="pumit"),
    params:
        config=as_json(stage_config("tokenizer", "pumit")),
        meta=train_metadata(),
        code=code_hash("pretrain_pumit"),
    shell:
        f"OMP_WAIT_POLICY=PASSIVE {TRAIN_LAUNCH} -m medtx pretrain tokenizer"
        " --index {input.indexes:q}"
        " --config {params.config:q} --metadata {params.meta:q} --out {output:q} > {log:q} 2>&1"


rule pretrain_mim:
    input:
        firewall=firewall_gate(),
        init=paths.pretrain_checkpoint(RESULTS, "tokenizer"),
        indexes=pretrain_indexes(),
        eva02=stage_files("mim", "pumit", "eva02_weights"),
    output:
        paths.pretrain_checkpoint(RESULTS, "mim"),
    log:
        f"{LOGS}/train/pretrain_mim.log",
    conda:
        ENV
    threads: train_threads("mim", "pumit")
    resources:
        **train_resources("mim", runtime=600, backbone="pumit"),
    params:
        config=as_json(stage_config("mim", "pumit")),
        meta=train_metadata(),
        code=code_hash("pretrain_pumit"),
    shell:
        f"OMP_WAIT_POLICY=PASSIVE {TRAIN_LAUNCH} -m medtx pretrain mim"
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
        f"{LOGS}/train/finetune/{{dataset}}/task-{{task}}/backbone-{{backbone}}/"
        "init-{init}_frac-{frac}/fold-{fold}.log",
    wildcard_constraints:
        task=one_of(TASKS),
        backbone=one_of(BACKBONES),
        init=one_of(INITS),
        frac="[0-9]+",
        fold="[0-9]+",
    conda:
        ENV
    threads: lambda w: train_threads("finetune", w.backbone)
    resources:
        # per job: its backbone's stage config and its task's step cost
        **train_resources("finetune", runtime=1440),
    params:
        config=lambda w: as_json(stage_config("finetune", w.backbone)),
        meta=lambda w: train_metadata(w.dataset),
        init=lambda w, input: shell_args("--init-checkpoint", input.get("init", [])),
        code=code_hash("finetune"),
    shell:
        f"OMP_WAIT_POLICY=PASSIVE {TRAIN_LAUNCH} -m medtx finetune"
        " --dataset {wildcards.dataset:q}"
        " --task {wildcards.task:q} --backbone {wildcards.backbone:q}"
        " --init {wildcards.init:q} --fraction {wildcards.frac:q}"
        " --fold {wildcards.fold:q} --manifest {input.manifest:q} --cache-index {input.cache_index:q}"
        " {params.init}"
        " --config {params.config:q} --metadata {params.meta:q}"
        " --out {output.model:q} --predictions {output.predictions:q}"
        " --metrics {output.metrics:q} > {log:q} 2>&1"


rule evaluate:
    input:
        metrics=finetune_targets("metrics.json"),
        pretrain=pretrain_targets(),
        scan_tables=finetuned_scan_tables(),
    output:
        # summary.md, table1.md, model_cards.md, every table as TSV, every figure
        tables=report(
            directory(paths.tables_dir(RESULTS)),
            patterns=["{name}.tsv", "{name}.png"],
            caption=f"{CAPTIONS}/evaluation.rst",
            category="Evaluation",
            labels={"file": "{name}"},
        ),
        # one beside each model: its data, hashes, metrics per subgroup, privacy
        cards=finetune_targets("model_card.md"),
    log:
        f"{LOGS}/train/evaluate.log",
    conda:
        ENV
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        subgroups=as_json(SUBGROUPS),
        summary=f"{paths.tables_dir(RESULTS)}/summary.md",
        code=code_hash("evaluate"),
    shell:
        "python -m medtx evaluate --metrics {input.metrics:q} --pretrain {input.pretrain:q}"
        " --scan-tables {input.scan_tables:q} --subgroups {params.subgroups:q}"
        " --summary {params.summary:q} > {log:q} 2>&1"
