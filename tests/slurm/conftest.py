"""A SLURM cluster for the tests in this folder.

Uses a running cluster if `sinfo` answers. Otherwise, when the slurm tests
were asked for (`pytest -m slurm`, or MEDTX_SLURM_START=1) and we are root,
installs and starts the one-node cluster of cluster.sh (apt packages, daemons
under $MEDTX_SLURM_DIR, one fake GPU) and stops it after the session
(MEDTX_SLURM_KEEP=1 leaves it running). A plain `pytest tests` (CI) never
installs anything: without a cluster these tests skip, saying why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CLUSTER_SH = HERE / "cluster.sh"
STATE = Path(os.environ.get("MEDTX_SLURM_DIR", "/tmp/medtx-slurm"))


@dataclass
class Cluster:
    started_here: bool
    gpus: int  # GPUs the default partition's nodes offer (gres gpu)
    jobcomp_log: Path | None  # cluster.sh's jobcomp/filetxt log, when it is ours


def _sinfo_answers() -> bool:
    conf = os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")
    if not shutil.which("sinfo") or not Path(conf).exists():
        return False  # sinfo without a config retries for a minute
    try:
        proc = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired:
        return False
    states = proc.stdout.split()
    return proc.returncode == 0 and any(s.startswith(("idle", "mixed", "alloc")) for s in states)


def _gpus() -> int:
    out = subprocess.run(
        ["sinfo", "-h", "-o", "%G"], capture_output=True, text=True, timeout=20
    ).stdout
    for gres in out.split(","):
        parts = gres.strip().split("(")[0].split(":")
        if parts[0] == "gpu" and parts[-1].isdigit():
            return int(parts[-1])
    return 0


def _cluster_sh(action: str, env: dict, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(CLUSTER_SH), action], capture_output=True, text=True, env=env, timeout=timeout
    )


def _asked_for(config) -> bool:
    return "slurm" in (config.getoption("-m") or "") or os.environ.get("MEDTX_SLURM_START") == "1"


@pytest.fixture(scope="session")
def slurm_cluster(pytestconfig):
    ours = STATE / "etc" / "slurm.conf"
    if _sinfo_answers():
        jobcomp = STATE / "log" / "jobcomp.log"
        yield Cluster(False, _gpus(), jobcomp if jobcomp.exists() else None)
        return
    if not _asked_for(pytestconfig):
        pytest.skip(
            "no SLURM cluster answers (sinfo); `pytest -m slurm` as root starts a test "
            "cluster (tests/slurm/cluster.sh)"
        )
    if os.geteuid() != 0:
        pytest.skip(
            "no SLURM cluster answers (sinfo), and starting one needs root (apt-get, daemons)"
        )
    env = {**os.environ, "MEDTX_SLURM_GPUS": os.environ.get("MEDTX_SLURM_GPUS", "2")}
    if not shutil.which("slurmctld"):
        if not shutil.which("apt-get"):
            pytest.skip("no SLURM cluster answers, SLURM is not installed and there is no apt-get")
        proc = _cluster_sh("install", env, timeout=900)
        if proc.returncode != 0:
            pytest.skip(f"could not install SLURM with apt-get: {proc.stderr.strip()[-800:]}")
    proc = _cluster_sh("start", env, timeout=600)
    if proc.returncode != 0:
        _cluster_sh("stop", env, timeout=120)
        pytest.fail(f"tests/slurm/cluster.sh start failed:\n{proc.stderr[-3000:]}")
    os.environ.setdefault("SLURM_CONF", str(ours))  # in case /etc/slurm/slurm.conf is not ours
    try:
        yield Cluster(True, _gpus(), STATE / "log" / "jobcomp.log")
    finally:
        if not os.environ.get("MEDTX_SLURM_KEEP"):
            _cluster_sh("stop", env, timeout=300)
