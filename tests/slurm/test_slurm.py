"""The workflow on a real SLURM cluster, through the repo's profile.

One run of `snakemake --profile slurm all` on tests/configs/slurm.yaml (2 T1
scans, 3 BraTS cases, one-epoch training), then SLURM's own
records (sacct, the jobcomp log) are checked against what the rules ask for:
every job a COMPLETED SLURM job with the rule's memory and time, and each
scan's chain of steps (group "subject") one SLURM job. The only overrides of
the profile are a short first status check and keeping the job logs.

Target: `all`, so pre-training, fine-tuning and evaluation run as SLURM jobs
too (MEDTX_SLURM_TARGETS overrides, e.g. "results/reports/provenance/index.html").

Needs a cluster: see conftest.py (as root it starts tests/slurm/cluster.sh).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.slurm, pytest.mark.integration, pytest.mark.slow]

VENV_BIN = REPO / ".venv" / "bin"
SNAKEMAKE = (
    str(VENV_BIN / "snakemake") if (VENV_BIN / "snakemake").exists() else shutil.which("snakemake")
)
CONFIG = REPO / "tests" / "configs" / "slurm.yaml"
TIMEOUT = int(os.environ.get("MEDTX_SLURM_TEST_TIMEOUT", "1800"))  # seconds, whole run
TARGETS = os.environ.get("MEDTX_SLURM_TARGETS", "all").split()
# the target and the local rules
LOCAL_RULES = ("all", "folds", "cache_index", "bids_derivatives", "scan_table", "record_list")
# A step's depth in its scan's chain (workflow/rules/preprocess.smk).
CHAIN_DEPTH = {
    "bet": 0,
    "flirt": 1,
    "n4_correct": 2,
    "pool_normalize": 3,
    "collect_provenance": 4,
    "brats_preprocess": 0,
    "collect_brats": 1,
}
SACCT_FIELDS = (
    "JobID",
    "JobName",
    "State",
    "ReqMem",
    "AllocCPUS",
    "Timelimit",
    "AllocTRES",
    "Elapsed",
    "Comment",
)


def env() -> dict:
    e = dict(os.environ)
    e["PATH"] = f"{VENV_BIN}{os.pathsep}{e['PATH']}"
    return e


def snakemake(workdir: Path, *args: str, snakefile: Path = REPO / "Snakefile", timeout: int = 300):
    cmd = [
        "timeout",
        "-k",
        "10",
        str(timeout),
        SNAKEMAKE,
        "--profile",
        str(REPO / "slurm"),
        "-s",
        str(snakefile),
        "-d",
        str(workdir),
        *args,
    ]
    return subprocess.run(
        cmd, cwd=workdir, capture_output=True, text=True, env=env(), timeout=timeout + 30
    )


def sacct(run_id: str, since: datetime) -> list[dict]:
    """This run's jobs (job name = the executor's run id), allocations only."""
    out = subprocess.run(
        [
            "sacct",
            "-X",
            "-P",
            "--noheader",
            "-S",
            since.strftime("%Y-%m-%dT%H:%M:%S"),
            "--name",
            run_id,
            f"--format={','.join(SACCT_FIELDS)}",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return [dict(zip(SACCT_FIELDS, line.split("|"))) for line in out.splitlines() if line.strip()]


def planned_resources(stdout: str) -> dict[str, dict[str, int]]:
    """rule -> {mem_mb, runtime, threads, jobs} from a dry run's job listing and stats."""
    rules: dict[str, dict[str, int]] = {}
    rule = None
    for line in stdout.splitlines():
        m = re.match(r"^\s*(?:local)?rule (\w+):$", line)
        if m:
            rule = m.group(1)
            rules.setdefault(rule, {"threads": 1})
            continue
        m = re.match(r"^\s*threads: (\d+)$", line)
        if m and rule:
            rules[rule]["threads"] = int(m.group(1))
        m = re.match(r"^\s*resources: (.*)$", line)
        if m and rule:
            res = dict(kv.split("=", 1) for kv in m.group(1).split(", "))
            rules[rule].update(mem_mb=int(res["mem_mb"]), runtime=int(res["runtime"]))
    table = stdout[stdout.index("Job stats:") :]
    for name, n in re.findall(r"^(\w+)\s+(\d+)$", table, flags=re.M):
        if name in rules:
            rules[name]["jobs"] = int(n)
    return rules


def timelimit(minutes: int) -> str:
    """Minutes as sacct prints a time limit: [D-]HH:MM:SS."""
    days, rest = divmod(minutes, 24 * 60)
    clock = f"{rest // 60:02d}:{rest % 60:02d}:00"
    return f"{days}-{clock}" if days else clock


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """A copy of the test config: the dry run and the real run see the same cohort."""
    copy = tmp_path_factory.mktemp("config") / CONFIG.name
    shutil.copyfile(CONFIG, copy)
    return copy


@pytest.fixture(scope="module")
def planned(config, tmp_path_factory):
    """The dry run of the same command: the rules' resources and job counts."""
    proc = snakemake(tmp_path_factory.mktemp("dry"), "--configfile", str(config), "-n", *TARGETS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return planned_resources(proc.stdout)


@pytest.fixture(scope="module")
def run(slurm_cluster, config, tmp_path_factory):
    work = tmp_path_factory.mktemp("slurm_wf")
    since = datetime.now() - timedelta(minutes=2)
    t0 = time.monotonic()
    proc = snakemake(
        work,
        "--configfile",
        str(config),
        "--slurm-init-seconds-before-status-checks",
        "5",
        "--slurm-keep-successful-logs",
        *TARGETS,
        timeout=TIMEOUT,
    )
    wall = time.monotonic() - t0
    (work / "snakemake.stderr").write_text(proc.stderr)
    assert proc.returncode == 0, f"rc={proc.returncode} after {wall:.0f}s\n{proc.stderr[-4000:]}"
    run_id = re.search(r"SLURM run ID: (\S+)", proc.stderr).group(1)
    jobs = sacct(run_id, since)
    summary = {
        "wall_s": round(wall),
        "slurm_jobs": len(jobs),
        "run_id": run_id,
        "steps": int(re.findall(r"(\d+) of \d+ steps \(100%\) done", proc.stderr)[-1]),
        "sacct": [
            {
                k: j[k]
                for k in (
                    "JobID",
                    "State",
                    "ReqMem",
                    "AllocCPUS",
                    "Timelimit",
                    "Elapsed",
                    "Comment",
                )
            }
            for j in jobs
        ],
    }
    (work / "slurm_run_summary.json").write_text(json.dumps(summary, indent=1))
    print(
        f"\nSLURM run: {summary['steps']} steps in {summary['slurm_jobs']} jobs, {wall:.0f} s "
        f"wall ({work / 'slurm_run_summary.json'})"
    )
    return work, proc.stderr, jobs


def rule_of(job: dict) -> str | None:
    """The rule of an ungrouped job, from the comment the executor sets
    (rule_<rule>[_wildcards_<values>]); None for a group job (rule_subject_...)."""
    comment = job["Comment"].removeprefix("rule_")
    return None if comment.startswith("subject_") else comment.split("_wildcards_")[0]


def need_comments(jobs: list[dict]) -> None:
    if not any(j["Comment"] for j in jobs):
        pytest.skip(
            "sacct shows no job comments (the cluster lacks "
            "AccountingStoreFlags=job_comment), so jobs cannot be told apart by rule"
        )


def job_logs(stderr: str) -> dict[str, Path]:
    """SLURM job id -> its log, as the executor announces each submission."""
    return {
        jid: Path(path)
        for jid, path in re.findall(r"submitted with SLURM jobid (\d+) \(log: (\S+\.log)\)", stderr)
    }


def group_members(log: Path) -> list[str]:
    """The rules of a group job's steps, one per step: the `--target-jobs`
    (rule:wildcards) of the inner Snakemake run, the first command in its log."""
    command = re.search(r"^\s+Command: (.*)$", log.read_text(), flags=re.M)
    assert command and "--target-jobs" in command.group(1), log
    targets = command.group(1).split("--target-jobs ", 1)[1].split(" --", 1)[0]
    return [job.split(":", 1)[0] for job in targets.split()]


def records(work: Path, pattern: str) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in work.glob(pattern)}


def scan_job_ids(record: dict) -> set[str | None]:
    """The SLURM job ids a scan's provenance record names, one per step."""
    return {step.get("slurm_job_id") for step in record["steps"]}


def test_outputs_exist(run, planned):
    work, _, _ = run
    t1 = work.glob("results/work/*/*/*_res-2_desc-preproc_T1w.nii.gz")
    assert len(list(t1)) == planned["pool_normalize"]["jobs"] == 2
    brats = work.glob("results/work/mini_brats/*/*_desc-preproc_mri.nii.gz")
    assert len(list(brats)) == planned["brats_preprocess"]["jobs"] == 3
    assert "BraTS20_Training_003" in (work / "results/reports/provenance/index.html").read_text()
    assert len(list(work.glob("results/folds/*_folds.tsv"))) == 1
    assert json.loads((work / "results/folds/firewall.json").read_text())["status"] == "passed"
    if "all" in TARGETS:
        runs = list(
            work.glob("results/finetune/mini_brats/task-segmentation/*/*/fold-*/metrics.json")
        )
        assert len(runs) == planned["finetune"]["jobs"] == 6  # 3 folds x 2 inits
        assert (work / "results/tables/summary.md").exists()


def test_every_job_is_a_completed_slurm_job(run, planned):
    _, stderr, jobs = run
    assert jobs, "sacct knows no job of this run"
    failed = [j for j in jobs if j["State"] != "COMPLETED"]
    assert not failed, failed
    need_comments(jobs)
    logs = job_logs(stderr)
    assert set(logs) == {j["JobID"] for j in jobs}
    # one job per ungrouped rule job, one per scan for the grouped chains
    grouped = [j for j in jobs if rule_of(j) is None]
    in_groups = Counter(r for j in grouped for r in group_members(logs[j["JobID"]]))
    ungrouped = Counter(rule_of(j) for j in jobs if rule_of(j))
    assert ungrouped == {
        rule: r["jobs"]
        for rule, r in planned.items()
        if rule not in set(in_groups) | set(LOCAL_RULES)
    }
    assert all(in_groups[rule] == planned[rule]["jobs"] for rule in in_groups), in_groups
    scans = planned["bet"]["jobs"] + planned["brats_preprocess"]["jobs"]
    assert scans == 2 + 3
    assert len(grouped) == scans  # scans, not steps (6+ per T1 scan, 2+ per BraTS case)
    assert sum(in_groups.values()) > 3 * scans


def test_rule_resources_reach_sbatch(run, planned):
    _, stderr, jobs = run
    need_comments(jobs)
    logs = job_logs(stderr)
    for job in jobs:
        if rule_of(job):
            want = planned[rule_of(job)]
            mem, minutes, cpus = want["mem_mb"], want["runtime"], want["threads"]
        else:
            # a scan's group job, as Snakemake sizes one: steps at the same depth
            # may run side by side (their memory and threads add up), depths run
            # one after the other (the largest layer's memory, the sum of the
            # layers' longest times)
            layers: dict[int, list[str]] = {}
            for rule in group_members(logs[job["JobID"]]):
                layers.setdefault(CHAIN_DEPTH[rule], []).append(rule)
            mem = max(sum(planned[r]["mem_mb"] for r in layer) for layer in layers.values())
            minutes = sum(max(planned[r]["runtime"] for r in layer) for layer in layers.values())
            cpus = max(sum(planned[r]["threads"] for r in layer) for layer in layers.values())
        assert job["ReqMem"] == f"{mem}M", job
        assert job["Timelimit"] == timelimit(minutes), job
        assert job["AllocCPUS"] == str(cpus), job


def test_training_ran_as_slurm_jobs_without_a_gpu(run, planned):
    """train/gpu is false in the test config: the training jobs ask for no GPU
    (even where the cluster has one) and still ran, each as its own SLURM job."""
    if "all" not in TARGETS:
        pytest.skip(f"targets {TARGETS} do not include training")
    _, _, jobs = run
    need_comments(jobs)
    training = [
        j
        for j in jobs
        if rule_of(j) in ("pretrain_exemplar", "pretrain_masked", "finetune", "evaluate")
    ]
    assert Counter(rule_of(j) for j in training) == {
        "pretrain_exemplar": 1,
        "pretrain_masked": 1,
        "finetune": planned["finetune"]["jobs"],
        "evaluate": 1,
    }
    assert all("gpu" not in j["AllocTRES"] for j in training), training
    assert {j["State"] for j in training} == {"COMPLETED"}


def test_each_scan_is_one_slurm_job(run, planned):
    """Every step of a scan ran in the same SLURM job, and no two scans shared one."""
    work, _, jobs = run
    need_comments(jobs)
    grouped = {j["JobID"] for j in jobs if rule_of(j) is None}
    t1 = records(work, "results/work/mini_*/sub-*/*_provenance.json")
    brats = records(work, "results/work/mini_brats/*/*_provenance.json")
    assert len(t1) == planned["bet"]["jobs"] and len(brats) == planned["brats_preprocess"]["jobs"]
    per_scan = {}
    for name, record in {**t1, **brats}.items():
        ids = scan_job_ids(record)
        assert len(ids) == 1 and None not in ids, (name, ids)
        per_scan[name] = ids.pop()
    assert sorted(per_scan.values()) == sorted(grouped)  # one job per scan, each scan its own


def test_jobcomp_log_agrees(run, slurm_cluster):
    if slurm_cluster.jobcomp_log is None:
        pytest.skip("not our test cluster: no jobcomp/filetxt log to read")
    _, _, jobs = run
    log = slurm_cluster.jobcomp_log.read_text()
    states = dict(re.findall(r"JobId=(\d+) .*?JobState=(\w+)", log))
    assert {states.get(j["JobID"]) for j in jobs} == {"COMPLETED"}


def test_job_log_is_where_the_executor_says(run):
    _, stderr, _ = run
    logs = job_logs(stderr).values()
    assert logs and all(p.exists() for p in logs)
    group_log = next(p for p in logs if p.parent.name.startswith("group_subject_bet"))
    text = group_log.read_text()
    assert "bet" in group_members(group_log) and re.search(r"^rule bet:$", text, flags=re.M)
    assert "--executor slurm-jobstep" in text


@pytest.mark.parametrize("status_command", ["sacct", "squeue"])
def test_threads_and_gpu_resources_map_to_sbatch(slurm_cluster, tmp_path, status_command):
    """threads -> --cpus-per-task, gpu=1 -> --gpus=1 (fake GPUs on the test cluster);
    under either status command (squeue: MinJobAge >= 3x the first status delay)."""
    gpu = slurm_cluster.gpus > 0
    since = datetime.now() - timedelta(minutes=2)
    proc = snakemake(
        tmp_path,
        "--slurm-init-seconds-before-status-checks",
        "3",
        "--slurm-status-command",
        status_command,
        "--config",
        f"gpu={gpu}",
        snakefile=Path(__file__).with_name("probe.smk"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Falling back to 'sacct'" not in proc.stderr
    assert "cpus=2" in (tmp_path / "probe/threads.txt").read_text()
    jobs = sacct(re.search(r"SLURM run ID: (\S+)", proc.stderr).group(1), since)
    need_comments(jobs)
    by_rule = {j["Comment"].removeprefix("rule_"): j for j in jobs}
    assert by_rule["threads"]["AllocCPUS"] == "2" and by_rule["threads"]["ReqMem"] == "200M"
    assert by_rule["threads"]["Timelimit"] == "00:03:00"
    if not gpu:
        pytest.skip("the cluster has no GPUs (gres gpu): the gpu=1 half was not run")
    assert "gres/gpu=1" in by_rule["gpu"]["AllocTRES"]
    assert re.search(r"cuda=\d", (tmp_path / "probe/gpu.txt").read_text())
    # train: {gpus: 2}: one SLURM task with both GPUs; the script starts once and
    # torchrun starts the two ranks, which find each other (gloo: the GPUs are fake)
    if slurm_cluster.gpus < 2:
        pytest.skip("the cluster has fewer than 2 GPUs: the gpus=2 job was not run")
    assert "gres/gpu=2" in by_rule["ddp"]["AllocTRES"]
    log = (tmp_path / "probe/ddp.txt").read_text()
    assert log.count("start job=") == 1 and "tasks=1" in log, log
    assert sorted(re.findall(r"^rank (\d)/2 sum 1 ", log, flags=re.M)) == ["0", "1"], log
