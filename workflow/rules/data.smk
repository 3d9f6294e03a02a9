# The built-in demo cohort: datasets with a `generate` section are made from
# the ICBM 2009c template (see medtx/data/demo.py) instead of being read.


rule make_demo_t1:
    output:
        t1="{root}/sub-{subject}/anat/sub-{subject}_T1w.nii.gz",
    log:
        f"{LOGS}/data/make_demo_t1/{{root}}/{{subject}}.log",
    wildcard_constraints:
        root=root_pattern("t1"),
    conda:
        ENV
    resources:
        mem_mb=3000,
        runtime=10,
    params:
        spec=lambda w: as_json(generated("t1")[w.root]),
        code=code_hash("demo"),
    shell:
        "python -m medtx demo t1-scan --spec {params.spec:q} --subject {wildcards.subject:q}"
        " --out {output.t1:q} > {log:q} 2>&1"


rule make_demo_participants:
    output:
        tsv="{root}/participants.tsv",
        description="{root}/dataset_description.json",
    log:
        f"{LOGS}/data/make_demo_participants/{{root}}.log",
    wildcard_constraints:
        root=root_pattern("t1"),
    conda:
        ENV
    resources:
        mem_mb=500,
        runtime=5,
    params:
        spec=lambda w: as_json(generated("t1")[w.root]),
        code=code_hash("demo"),
    shell:
        "python -m medtx demo t1-participants --spec {params.spec:q} --out {wildcards.root:q} > {log:q} 2>&1"


rule make_demo_brats:
    output:
        multiext(
            "{root}/{case}/{case}_",
            "t1.nii.gz",
            "t1ce.nii.gz",
            "t2.nii.gz",
            "flair.nii.gz",
            "seg.nii.gz",
        ),
    log:
        f"{LOGS}/data/make_demo_brats/{{root}}/{{case}}.log",
    wildcard_constraints:
        root=root_pattern("brats"),
        case="[A-Za-z0-9_]+",
    conda:
        ENV
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        spec=lambda w: as_json(generated("brats")[w.root]),
        code=code_hash("demo"),
    shell:
        "python -m medtx demo brats-case --spec {params.spec:q} --subject {wildcards.case:q}"
        " --out {wildcards.root:q} > {log:q} 2>&1"


# The scan tables (results/scans/<dataset>.tsv), as common.smk read and checked
# them. Written by this job only, so under the run's lock and never by a dry run
# or a refused one. Its input, a stamp in the working directory, is newer than the
# table exactly when the table's content changed (medtx.data.scans): the job and
# every rule that reads the table then run, from whichever working directory.


localrules:
    scan_table,


rule scan_table:
    input:
        stamp=lambda w: SCAN_STAMPS[w.dataset],
    output:
        table=paths.scan_table(RESULTS, "{dataset}"),
    log:
        f"{LOGS}/data/scan_table/{{dataset}}.log",
    run:
        write_scan_table(SCAN_TEXT[wildcards.dataset], output.table)
