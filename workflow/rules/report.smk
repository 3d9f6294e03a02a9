# The cohort provenance report: a row per scan, thumbnails, QC, exclusions,
# and a methods paragraph generated from the settings actually used. Then, the
# run's index (medtx.provenance.run_index): every scan with its chain head and
# raw inputs, signed with MEDTX_PROVENANCE_KEY when set, which `medtx audit`
# holds the scan folders to (a rollback, a substitution, a deletion).

from medtx.provenance.run_index import index_path


rule provenance_report:
    input:
        records=[record_list(name) for name in OK],
        tables=[paths.scan_table(RESULTS, name) for name in config["datasets"]],
    output:
        page=report(
            directory(paths.report_dir(RESULTS)),
            htmlindex=paths.REPORT_INDEX,
            caption=f"{CAPTIONS}/provenance.rst",
            category="Provenance",
        ),
        index=index_path(RESULTS),
    log:
        f"{LOGS}/report/provenance_report.log",
    conda:
        ENV
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        settings=as_json(
            {**output_settings(PRE), "backend": BACKEND, "seed": config["seed"]}
        ),
        page=paths.report(RESULTS),
        records=lambda w, input: argfiles("--records", input.records),
        code=code_hash("report"),
    shell:
        "python -m medtx report {params.records} --scan-table {input.tables:q}"
        " --settings {params.settings:q} --out {params.page:q} > {log:q} 2>&1"
        " && python -m medtx.provenance.run_index {params.records}"
        " --out {output.index:q} >> {log:q} 2>&1"
