"""bench/registration.py's Clinica rows: the keyword fix makes Clinica's call affine.

Clinica 0.12's ``--use-antspy`` path calls ``ants.registration(...,
type_of_transformation="antsRegistrationSyN[a]")``; ANTsPy reads
``type_of_transform`` and ignores unknown keywords, so the call runs a deformable
SyN. The call is made here exactly as Clinica makes it, with real ANTsPy, in a
fresh interpreter: as shipped it returns a warp field; with the bench's fix on
PYTHONPATH, an affine alone, and the fix logs what it renamed.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]

CLINICAS_CALL = """
import json, sys
import numpy as np, ants
g = np.indices((24, 24, 24)).astype(float)
rng = np.random.default_rng(0)
fixed = np.exp(-((g - 12) ** 2).sum(0) / 40) + 0.05 * rng.random(g.shape[1:])
centre = np.array([13, 11, 12])[:, None, None, None]
moving = np.exp(-((g - centre) ** 2).sum(0) / 45) + 0.05 * rng.random(g.shape[1:])
out = ants.registration(
    fixed=ants.from_numpy(fixed), moving=ants.from_numpy(moving),
    type_of_transformation="antsRegistrationSyN[a]",
)
print(json.dumps(out["fwdtransforms"]))
"""


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_registration", REPO / "bench" / "registration.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def clinicas_call(env: dict) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", CLINICAS_CALL], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_as_shipped_the_call_is_deformable_and_fixed_it_is_affine(bench, tmp_path):
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MEDTX_BENCH_KEYWORD_LOG")
    }
    shipped = clinicas_call(env)
    assert len(shipped) == 2 and shipped[0].endswith(".nii.gz")  # a warp field, then the affine

    log = tmp_path / "calls.jsonl"
    fixed = clinicas_call(
        {**env, "PYTHONPATH": str(bench.keyword_fix(tmp_path)), "MEDTX_BENCH_KEYWORD_LOG": str(log)}
    )
    assert len(fixed) == 1 and fixed[0].endswith(".mat")  # the affine alone
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls == [{"misspelt": "antsRegistrationSyN[a]", "ran": "antsRegistrationSyN[a]"}]


def test_the_rows_say_what_each_clinica_chain_ran(bench):
    assert "affine" in bench.LABELS["clinica"] and "fixed" in bench.LABELS["clinica"]
    assert "deformable" in bench.LABELS["clinica-as-shipped"]
    assert set(bench.CLINICA_CHAINS) <= set(bench.LABELS)
    renamed = {"misspelt": "antsRegistrationSyN[a]", "ran": "antsRegistrationSyN[a]"}
    rows = [{"chain": "clinica", "registration_calls": [renamed]}]
    assert "1 of 1 registration calls had type_of_transformation= renamed" in (
        bench.keyword_status(rows, "clinica")
    )
    assert "no registration call seen" in bench.keyword_status([{"chain": "clinica"}], "clinica")
    assert bench.keyword_status(rows, "clinica-as-shipped") == ""
