# Fold manifests per labelled dataset and task, and the leakage firewall that
# every training rule requires (so a leak stops the run before any training).


rule make_folds:
    input:
        table=paths.scan_table(RESULTS, "{dataset}"),
        records=lambda w: record_list(w.dataset),
        overrides=folds_overrides(),
    output:
        tsv=paths.manifest(RESULTS, "{dataset}", "{task}"),
        sidecar=paths.manifest_sidecar(RESULTS, "{dataset}", "{task}"),
    log:
        f"{LOGS}/folds/make_folds/{{dataset}}_task-{{task}}.log",
    wildcard_constraints:
        task=one_of(TASKS),
    conda:
        ENV
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        folds=as_json(FOLDS),
        overrides=lambda w, input: shell_args("--overrides", input.overrides),
        code=code_hash("folds"),
    shell:
        "python -m medtx folds --dataset {wildcards.dataset:q} --task {wildcards.task:q}"
        " --table {input.table:q} --records @{input.records:q} {params.overrides}"
        " --params {params.folds:q} --out-tsv {output.tsv:q} --out-json {output.sidecar:q}"
        " > {log:q} 2>&1"


rule leakage_firewall:
    input:
        manifests=manifest_targets(),
        pretrain=[
            paths.scan_table(RESULTS, name) for name in datasets_with_role("pretrain")
        ],
    output:
        FIREWALL,
    log:
        f"{LOGS}/folds/leakage_firewall.log",
    conda:
        ENV
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        identities=as_json(config["identities"]),
        pretrain=lambda w, input: shell_args("--pretrain-table", input.pretrain),
        code=code_hash("firewall"),
    shell:
        "python -m medtx firewall --manifest {input.manifests:q} {params.pretrain}"
        " --identities {params.identities:q} --out {output:q} > {log:q} 2>&1"


# A received encoder (train/init_from) against one manifest: its own small check,
# which the backbone's pretrained runs of that dataset x task take as a plain
# input, so a new or changed bundle reruns exactly those runs in the same run.
rule encoder_firewall:
    input:
        manifest=paths.manifest(RESULTS, "{dataset}", "{task}"),
        bundle=lambda w: INIT_FROM[w.backbone],
    output:
        ENCODER_FIREWALL,
    log:
        f"{LOGS}/folds/encoder_firewall/{{dataset}}_task-{{task}}_encoder-{{backbone}}.log",
    wildcard_constraints:
        task=one_of(TASKS),
        backbone=one_of(BACKBONES),
    conda:
        ENV
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        identities=as_json(config["identities"]),
        code=code_hash("firewall"),
    shell:
        "python -m medtx firewall --manifest {input.manifest:q} --bundle {input.bundle:q}"
        " --identities {params.identities:q} --out {output:q} > {log:q} 2>&1"


rule folds:
    default_target: False
    input:
        manifest_targets(),
        FIREWALL,
