# Fold manifests per labelled dataset and task, and the leakage firewall that
# every training rule requires (so a leak stops the run before any training).


rule make_folds:
    input:
        table=paths.scan_table(RESULTS, "{dataset}"),
        records=lambda w: dataset_targets(w.dataset, "provenance"),
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
        " --table {input.table:q} --records {input.records:q} {params.overrides}"
        " --params {params.folds:q} --out-tsv {output.tsv:q} --out-json {output.sidecar:q}"
        " > {log:q} 2>&1"


rule leakage_firewall:
    input:
        manifests=manifest_targets(),
        pretrain=[
            paths.scan_table(RESULTS, name) for name in datasets_with_role("pretrain")
        ],
        bundles=list(INIT_FROM.values()),
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
        bundles=lambda w, input: shell_args("--bundle", input.bundles),
        code=code_hash("firewall"),
    shell:
        "python -m medtx firewall --manifest {input.manifests:q} {params.pretrain}"
        " {params.bundles} --identities {params.identities:q} --out {output:q} > {log:q} 2>&1"


rule folds:
    default_target: False
    input:
        manifest_targets(),
        FIREWALL,
