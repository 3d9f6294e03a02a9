"""Which preprocessing backend runs: FSL (the paper's path) or antspyx.

``auto`` picks FSL when its programs are installed, so a user on a cluster with
FSL gets the paper's BET/FLIRT without changing the config, and a laptop
without FSL still runs. The choice is recorded in every provenance record.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medtx.errors import ConfigError, ToolFailedError, ToolNotFoundError

BACKENDS = ("auto", "fsl", "ants")


def fsl_program(name: str) -> str | None:
    """Path of an FSL program from $FSLDIR/bin or PATH, or None.

    ``$FSLDIR/bin`` comes first: it is the FSL whose version is recorded and
    which ``fsl_environment`` puts first on the commands' PATH, so the program
    checked here is the one that runs.
    """
    fsldir = os.environ.get("FSLDIR")
    if fsldir:
        found = shutil.which(name, path=str(Path(fsldir) / "bin"))
        if found:
            return found
    return shutil.which(name)


def fsl_available() -> bool:
    return all(fsl_program(p) for p in ("bet", "flirt"))


def resolve_backend(name: str) -> str:
    """Turn ``auto | fsl | ants`` into the backend that will run."""
    if name not in BACKENDS:
        raise ConfigError(
            f"config key 'preprocess/backend': {name!r} is not one of {list(BACKENDS)}"
        )
    if name == "auto":
        return "fsl" if fsl_available() else "ants"
    return name


def require_fsl() -> None:
    """Fail up front, with what to do, when the fsl backend has no FSL."""
    missing = [p for p in ("bet", "flirt") if not fsl_program(p)]
    if missing:
        raise ToolNotFoundError(
            f"backend 'fsl' needs FSL, but {', '.join(missing)} is not on PATH and FSLDIR "
            f"is {os.environ.get('FSLDIR') or 'unset'}; install FSL (or `module load fsl`) "
            "or set preprocess/backend to 'ants' or 'auto'"
        )


def fsl_environment() -> dict[str, str]:
    """What FSL commands need in their environment, on top of ours.

    ``fsl_program`` accepts FSL under ``$FSLDIR/bin`` when FSL's setup script
    did not put that folder on PATH, but nipype looks commands up on PATH (and
    ``bet`` calls ``bet2``), so the folder goes first there. FSLOUTPUTTYPE makes
    FSL write the ``.nii.gz`` names medtx reads back.
    """
    env = {"FSLOUTPUTTYPE": "NIFTI_GZ"}
    fsldir = os.environ.get("FSLDIR")
    if fsldir and (Path(fsldir) / "bin").is_dir():
        path = os.environ.get("PATH", os.defpath)
        env["PATH"] = os.pathsep.join([str(Path(fsldir) / "bin"), path])
    return env


def fsl_install_version() -> str | None:
    """The version of the FSL whose ``bet`` runs (``etc/fslversion``), or None.

    Read from ``$FSLDIR``, else from the install above the ``bet`` found on
    PATH (FSL set up without ``$FSLDIR``). BET has no version flag of its own,
    so this is also BET's version.
    """
    from medtx.provenance.records import fsl_version

    roots = [Path(os.environ["FSLDIR"])] if os.environ.get("FSLDIR") else []
    bet = fsl_program("bet")
    if bet:  # <root>/bin/bet, or <root>/share/fsl/bin/bet (FSL 6.0.6 and later)
        parents = Path(bet).resolve().parents
        roots += [parents[i] for i in (1, 3) if i < len(parents)]
    for root in roots:
        version = fsl_version(root)
        if version:
            return version
    return None


def fsl_program_version(name: str, flag: str = "-version") -> str | None:
    """The version an FSL program prints (``flirt -version``: "FLIRT version 6.0").

    FLIRT is versioned apart from FSL (FSL 6.0.7 ships FLIRT 6.0), and a
    methods section cites the program's own number.
    """
    program = fsl_program(name)
    if program is None:
        return None
    try:
        done = subprocess.run(
            [program, flag],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **fsl_environment()},
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"version\s+(\S+)", f"{done.stdout}\n{done.stderr}", flags=re.IGNORECASE)
    return match.group(1) if match else None


def run_fsl(
    interface: Any,
    *,
    source: str | Path,
    expect: Sequence[str | Path],
    step: str | None = None,
    scan: str | None = None,
) -> None:
    """Run an FSL nipype interface with FSL usable; raise ``ToolFailedError`` if it fails.

    nipype raises a many-line RuntimeError/OSError (BET, a missing program) or,
    for FLIRT, returns quietly after a non-zero exit; either way the user gets
    one line naming the step, ``source`` (the file the step works on) and the
    program's last line of stderr. A zero exit that leaves an ``expect`` file
    unwritten is a failure too.
    """
    program = interface.cmd.split()[0]
    interface.inputs.environ.update(fsl_environment())
    interface.terminal_output = "allatonce"  # keep the output for the error, not the log
    runtime = interface.run(ignore_exception=True).runtime
    missing = [Path(p).name for p in expect if not Path(p).exists()]
    if getattr(runtime, "traceback", None) is None and not missing:
        return
    said = _last_line(getattr(runtime, "stderr", None)) or _last_line(
        getattr(runtime, "stdout", None)
    )
    if said is None:  # nipype's own exception, e.g. 'No command "bet" found on host ...'
        args = getattr(runtime, "traceback_args", None) or ("",)
        said = next(iter(str(args[0]).splitlines()), "") or None
    code = getattr(runtime, "returncode", None)
    if code not in (None, 0):
        problem = f"exit status {code}"
    elif code is None:
        problem = "it did not run"
    elif missing:
        problem = f"it wrote no {', '.join(missing)}"
    else:
        problem = "it reported an error"
    raise ToolFailedError(
        program, source, f"{problem}: {said}" if said else problem, step=step, scan=scan
    )


def _last_line(text: str | None) -> str | None:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else None


def replay_command(interface: Any) -> str:
    """The interface's command line with its input file absolute, for a record.

    nipype's BET writes its input relative to the working directory (old BET
    versions failed on long paths); a record must name the file from anywhere.
    """
    cmdline = str(interface.cmdline)
    in_file = getattr(interface.inputs, "in_file", None)
    if isinstance(in_file, str) and in_file:
        relative, absolute = os.path.relpath(in_file), os.path.abspath(in_file)
        cmdline = re.sub(
            rf"(?<=\s){re.escape(relative)}(?=\s|$)", lambda _: absolute, cmdline, count=1
        )
    return cmdline
