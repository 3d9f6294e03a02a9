#!/usr/bin/env bash
# The GPU checks, prepared for the day a GPU is lent; one command, under 8 minutes:
#
#   1. pytest -m gpu: every GPU test of both backbones (the Medical Transformer's
#      bit-for-bit deterministic training; PUMIT's stages under deterministic
#      kernels and bf16 autocast, tests/unit/models/test_pumit_gpu.py).
#   2. bench/train.py --sections cuda --quick: fp32 against bf16 steps (volumes/s,
#      peak memory), runs per GPU (the packing curve), DDP over 1 and 2 GPUs when
#      there are 2, and each stage's step against the memory the workflow plans
#      for it (medtx/train/step_cost.json) with the TFLOP/s it reaches.
#
# Each step runs under its own `timeout`. Everything lands in ONE JSON file:
# $OUT/gpu.json when $OUT is set (the device runner's folder), else
# bench/results/gpu.json (ignored by git): the GPU (nvidia-smi), each step's
# command, exit status and seconds, pytest's counts and failures, the bench's
# figures (its --json) and the end of each step's output.
#
#   bench/gpu.sh             run it (from anywhere; it works in the repo root)
#   bench/gpu.sh --dry-run   print the commands, check the tools, exit 0 (no GPU needed)
#
# PYTHON picks the interpreter (default: .venv/bin/python, else python3).
set -euo pipefail

cd "$(dirname "$0")/.."
DRY=0
case "${1:-}" in
--dry-run) DRY=1 ;;
"") ;;
*)
    echo "usage: bench/gpu.sh [--dry-run]" >&2
    exit 2
    ;;
esac

if [[ -n "${PYTHON:-}" ]]; then
    PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    PY=python3
fi
if [[ -n "${OUT:-}" ]]; then
    RESULT="$OUT/gpu.json"
else
    RESULT=bench/results/gpu.json
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# seconds per step: 10 + 150 + 300 = 460 s of 480, the rest for starting and writing
SMI_TIMEOUT=10
PYTEST_TIMEOUT=150
BENCH_TIMEOUT=300
KILL_AFTER=5

SMI=(nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader)
PYTEST=("$PY" -m pytest -m gpu -q -rA -p no:cacheprovider --junitxml="$WORK/pytest.xml" tests)
BENCH=("$PY" bench/train.py --sections cuda --quick --threads 2 --json "$WORK/bench.json")

if ((DRY)); then
    echo "bench/gpu.sh --dry-run: would run, in $(pwd), writing $RESULT:"
    echo "  timeout $SMI_TIMEOUT ${SMI[*]}"
    echo "  timeout $PYTEST_TIMEOUT ${PYTEST[*]}"
    echo "  timeout $BENCH_TIMEOUT ${BENCH[*]}"
    missing=0
    for tool in timeout mktemp "$PY"; do
        if command -v "$tool" >/dev/null; then
            echo "  found $tool: $(command -v "$tool")"
        else
            echo "  MISSING $tool" >&2
            missing=1
        fi
    done
    if command -v nvidia-smi >/dev/null; then
        echo "  found nvidia-smi: $(command -v nvidia-smi)"
    else
        echo "  no nvidia-smi here (the GPU's row will say so)"
    fi
    for script in bench/train.py tests/unit/models/test_pumit_gpu.py; do
        [[ -f $script ]] || {
            echo "  MISSING $script" >&2
            missing=1
        }
    done
    if ((!missing)); then
        "$PY" - <<'EOF' || missing=1
import importlib.util
import torch
for name in ("pytest", "medtx"):
    if importlib.util.find_spec(name) is None:
        raise SystemExit(f"  MISSING python module {name}")
print(f"  torch {torch.__version__}: CUDA {'available' if torch.cuda.is_available() else 'not available'}"
      f" ({torch.cuda.device_count()} GPU(s))")
EOF
    fi
    if ((missing)); then
        echo "bench/gpu.sh --dry-run: something is missing (above)" >&2
        exit 1
    fi
    echo "bench/gpu.sh --dry-run: ready"
    exit 0
fi

# run NAME TIMEOUT COMMAND...: its output to $WORK/NAME.log, exit status and
# milliseconds to $WORK/NAME.status; a failure or timeout does not stop the script
run() {
    local name=$1 limit=$2 rc=0 start
    shift 2
    echo "== $name: timeout $limit $*"
    start=$(date +%s%N)
    timeout --kill-after="$KILL_AFTER" "$limit" "$@" >"$WORK/$name.log" 2>&1 || rc=$?
    echo "$rc $((($(date +%s%N) - start) / 1000000))" >"$WORK/$name.status"
    tail -n 40 "$WORK/$name.log"
    echo "== $name: exit $rc"
}

printf '%s\n' "${SMI[*]}" "${PYTEST[*]}" "${BENCH[*]}" >"$WORK/commands.txt"
if command -v nvidia-smi >/dev/null; then
    run gpu "$SMI_TIMEOUT" "${SMI[@]}"
else
    echo "no nvidia-smi" >"$WORK/gpu.log"
    echo "127 0" >"$WORK/gpu.status"
fi
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
run pytest "$PYTEST_TIMEOUT" "${PYTEST[@]}"
run bench "$BENCH_TIMEOUT" "${BENCH[@]}"

mkdir -p "$(dirname "$RESULT")"
"$PY" - "$WORK" "$RESULT" <<'EOF'
"""Merge what the steps left in WORK into one JSON file."""
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

work, result = Path(sys.argv[1]), Path(sys.argv[2])
commands = (work / "commands.txt").read_text().splitlines()


def step(name, command):
    status = (work / f"{name}.status").read_text().split() if (work / f"{name}.status").exists() else []
    log = (work / f"{name}.log").read_text(errors="replace") if (work / f"{name}.log").exists() else ""
    rc = int(status[0]) if status else None
    return {
        "command": command,
        "exit": rc,
        "timed_out": rc in (124, 137),
        "seconds": int(status[1]) / 1000 if len(status) > 1 else None,
        "output_tail": log[-6000:],
    }


out = {"gpu": step("gpu", commands[0]), "pytest": step("pytest", commands[1])}
out["bench"] = step("bench", commands[2])
xml = work / "pytest.xml"
if xml.exists():
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests = []
    for case in suite.iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (found.get("message") or "")[:500]
                break
        else:
            message = ""
        tests.append({
            "test": f"{case.get('classname')}::{case.get('name')}",
            "outcome": outcome,
            "seconds": float(case.get("time") or 0),
            "message": message,
        })
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    out["pytest"].update(counts=counts, tests=tests)
bench = work / "bench.json"
out["bench"]["figures"] = json.loads(bench.read_text()) if bench.exists() else None
result.write_text(json.dumps(out, indent=1) + "\n")
print(f"wrote {result}")
EOF
