"""File names nobody planned for never reach a shell as code.

Issue 12: an image whose file name held ``$(...)`` ran that command, because
rules wrote paths into their shell lines unquoted; a path with a space split
into several arguments and failed inside ``bet``. Every path, wildcard and
log in a rule's shell line is now quoted (Snakemake's ``:q``, or
``shell_args`` for params that are whole arguments).
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import REPO, sphere, write_nifti

SNAKEMAKE = str(REPO / ".venv" / "bin" / "snakemake")
RULE_FILES = [REPO / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk"))]
# A substitution Snakemake makes into a shell line: {input.t1}, {log}, {params.x:q} ...
PLACEHOLDER = re.compile(r"(?<!\{)\{((?:input|output|log|wildcards|params|resources)[.\w]*)(:q)?\}")
# Params that are whole arguments ("--init-checkpoint PATH" or ""), built by shell_args
# (or argfiles: "--records @PATH ...").
ARGUMENT_PARAMS = {"overrides", "pretrain", "init", "records"}

# Everything a shell reads as code, quotes, a space and letters outside ASCII.
HOSTILE = "a b;$(touch PWNED1) `touch PWNED2` 'q' \"d\" & é中"


def test_every_substitution_in_a_shell_line_is_quoted():
    unquoted = []
    for path in RULE_FILES:
        text = path.read_text()
        for match in PLACEHOLDER.finditer(text):
            name, quoted = match.groups()
            if quoted:
                continue
            param = name.removeprefix("params.")
            built = re.search(rf"\b{param}=lambda w, input: (shell_args|argfiles)\(", text)
            if name.startswith("params.") and param in ARGUMENT_PARAMS and built:
                continue
            line = text.count("\n", 0, match.start()) + 1
            unquoted.append(f"{path.name}:{line}: {match.group(0)}")
    assert not unquoted, unquoted


def test_rule_file_helpers_quote_what_they_build():
    common = (REPO / "workflow" / "rules" / "common.smk").read_text()
    assert '{role}={{{direction}.{role}:q}}"' in common  # io_args
    assert 'f"{flag} {shlex.join(paths)}"' in common  # shell_args
    assert 'f"@{shlex.quote(f)}" for f in files' in common  # argfiles


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder``: size and mtime."""
    files = (p for p in folder.rglob("*") if p.is_file())
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in files}


@pytest.mark.integration
def test_hostile_names_reach_medtx_exactly_and_run_nothing(tmp_path, medtx_env):
    """A real scan job (``preprocess_t1``) on a CSV row whose file, folder, results and
    workdir are hostile."""
    data = tmp_path / "in $(touch PWNED_DIR) é"
    image = data / f"{HOSTILE}.nii.gz"
    # 4 mm voxels: a head-sized field of view, so the affine to the template is sane
    write_nifti(image, sphere((40, 48, 40), radius=14), np.diag([4.0, 4.0, 4.0, 1.0]))
    with open(data / "scans.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["subject", "t1"], ["h0", image.name]])
    results = f"res {HOSTILE}"
    config = {
        "results": results,
        "datasets": {"h": {"kind": "csv", "role": ["pretrain"], "path": str(data / "scans.csv")}},
        "preprocess": {
            "backend": "ants",
            "bet": {"ants": {"method": "template", "aff_iterations": [20, 10]}},
        },
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    work = tmp_path / "wd ;$(touch PWNED_WD) é"
    work.mkdir()
    before = snapshot(tmp_path)
    proc = subprocess.run(
        [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(work)]
        + ["--configfile", str(tmp_path / "c.yaml"), "--cores", "1"]
        + ["--until", "preprocess_t1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=medtx_env,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Traceback" not in out
    # the markers are relative: a command that ran would leave one in its folder
    pwned = list(tmp_path.rglob("PWNED*"))
    pwned += [p for d in (REPO, Path.home(), Path.cwd()) for p in d.glob("PWNED*")]
    assert not pwned, pwned

    scan_dir = work / results / "work" / "h" / "sub-h0"
    record = json.loads((scan_dir / "sub-h0_step-bet.json").read_text())
    assert [i["path"] for i in record["inputs"]] == [str(image)]  # the exact path, one argv
    for suffix in ("desc-brain_T1w.nii.gz", "desc-brain_mask.nii.gz"):
        assert (scan_dir / f"sub-h0_{suffix}").stat().st_size > 0
    assert not (work / results / ".medtx-run.lock").exists()  # released on success

    after = snapshot(tmp_path)
    assert {k: after[k] for k in before if k in after} == before  # inputs untouched
    allowed = [str(work / results), str(work / "logs"), str(work / ".snakemake")]
    new = set(after) - set(before)
    assert not [p for p in new if not any(p.startswith(a + os.sep) for a in allowed)]
