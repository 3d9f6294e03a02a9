# The cohort provenance report: a row per scan, thumbnails, QC, exclusions,
# and a methods paragraph generated from the settings actually used.


rule provenance_report:
    input:
        records=scan_targets("provenance", "provenance"),
        tables=[paths.scan_table(RESULTS, name) for name in config["datasets"]],
    output:
        report(
            directory(paths.report_dir(RESULTS)),
            htmlindex=paths.REPORT_INDEX,
            caption=f"{CAPTIONS}/provenance.rst",
            category="Provenance",
        ),
    log:
        f"{LOGS}/report/provenance_report.log",
    conda:
        ENV
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        settings=as_json({**PRE, "backend": BACKEND, "seed": config["seed"]}),
        page=paths.report(RESULTS),
        code=code_hash("report"),
    shell:
        "python -m medtx report --records {input.records:q} --scan-table {input.tables:q}"
        " --settings {params.settings:q} --out {params.page:q} > {log:q} 2>&1"
