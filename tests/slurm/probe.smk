# A probe for tests/slurm: what `threads:`, `resources: gpu=1` and a 2-GPU
# training job (medtx.train.resources) become under the medtx SLURM profile.
# Each job records what SLURM gave it.
# config: gpu (bool) adds the GPU rules; run with --profile slurm -d <tmp>.
from pathlib import Path

from medtx.train.resources import launcher, training_resources, training_threads

DDP_STAGE = {"threads": 1, "num_workers": 0}


def targets():
    gpu = ["probe/gpu.txt", "probe/ddp.txt"] if config.get("gpu") else []
    return ["probe/threads.txt"] + gpu


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


# Two processes on two GPUs, as `train: {gpu: true, gpus: 2}` asks: the job
# script must start once (one "start" line) and torchrun start both ranks.
rule ddp:
    output:
        "probe/ddp.txt",
    threads: training_threads(DDP_STAGE, 2)
    resources:
        **training_resources(DDP_STAGE, gpu=True, gpus=2, mem_mb=1000, runtime=5),
    params:
        launch=launcher(2),
        script=Path(workflow.basedir) / "ddp_probe.py",
    shell:
        "echo start job=$SLURM_JOB_ID tasks=$SLURM_NTASKS cuda=$CUDA_VISIBLE_DEVICES >> {output};"
        " {params.launch} {params.script} >> {output} 2>&1"
