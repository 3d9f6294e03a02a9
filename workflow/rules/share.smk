# Copies to share: each T1 scan defaced in its native space with quickshear
# (medtx.share.deface), from the bet step's brain mask, face-checked again, with
# a provenance record naming the tool and its version. Not part of `all`: run
# `snakemake defaced`.


# a function: only asked for when the rule is (a list would be read on every start)
rule defaced:
    input:
        lambda w: [
            paths.defaced(RESULTS, name, scan)["t1"]
            for name in t1_datasets()
            for scan in OK[name]["scan"]
        ],


rule deface:
    input:
        t1=raw_t1,
        record=T1["provenance"],  # the chain ran; its bet step wrote the mask
    output:
        t1=DEFACED["t1"],
        record=DEFACED["record"],
    log:
        f"{LOGS}/share/deface/{{dataset}}/{{scan}}.log",
    wildcard_constraints:
        dataset=one_of(t1_datasets()),
    conda:
        ENV
    resources:
        mem_mb=3000,
        runtime=10,
    params:
        mask=lambda w: T1["bet_mask"].format(**w),
        qc=as_json(config["qc"]),
        code=code_hash("deface"),
    shell:
        "python -m medtx deface {input.t1:q} {output.t1:q} --mask {params.mask:q}"
        " --record {output.record:q} --qc {params.qc:q} --scan {wildcards.scan:q} > {log:q} 2>&1"
