# A two-rule probe for tests/slurm: what `threads:` and `resources: gpu=1`
# become under the medtx SLURM profile. Each job records what SLURM gave it.
# config: gpu (bool) adds the GPU rule; run with --profile slurm -d <tmp>.


def targets():
    return ["probe/threads.txt"] + (["probe/gpu.txt"] if config.get("gpu") else [])


rule all:
    input:
        targets(),


rule threads:
    output:
        "probe/threads.txt",
    threads: 2
    resources:
        mem_mb=200,
        runtime=3,
    shell:
        "echo job=$SLURM_JOB_ID cpus=$SLURM_CPUS_PER_TASK > {output}"


rule gpu:
    output:
        "probe/gpu.txt",
    resources:
        gpu=1,
        mem_mb=200,
        runtime=3,
    shell:
        "echo job=$SLURM_JOB_ID cuda=$CUDA_VISIBLE_DEVICES > {output}"
