# Predictions for new scans: each dataset with role predict, preprocessed by the
# rules above, through each fold-ensemble bundle of predict/bundle (medtx export),
# into results/predict/<dataset>/<bundle>/ (medtx.predict.run). A bundle must have
# been trained on inputs preprocessed as this config does: checked at start.


rule predict:
    input:
        index=lambda w: cache_index(w.dataset),
        records=lambda w: record_list(w.dataset),
        table=lambda w: paths.scan_table(RESULTS, w.dataset),
        bundle=lambda w: PREDICT_BUNDLES[w.bundle],
    output:
        directory(f"{RESULTS}/predict/{{dataset}}/{{bundle}}"),
    log:
        f"{LOGS}/predict/{{dataset}}/{{bundle}}.log",
    wildcard_constraints:
        dataset=one_of(PREDICT_DATASETS),
        bundle=one_of([re.escape(b) for b in PREDICT_BUNDLES]),
    conda:
        ENV
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        code=code_hash("predict"),
    shell:
        "python -m medtx predict {input.bundle:q} --cache-index {input.index:q}"
        " --records @{input.records:q} --scan-table {input.table:q} --out {output:q}"
        " > {log:q} 2>&1"
