"""Error types whose messages name the file and the problem.

Every error a user can cause is a ``MedtxError`` (a ``ValueError``), so the
command line can print its message as the last line of the log instead of a
traceback from deep inside nibabel or ITK.
"""

from __future__ import annotations

from pathlib import Path


class MedtxError(ValueError):
    """A problem the user can fix: bad input, bad config, missing tool."""


class BadScanError(MedtxError):
    """A scan that cannot be processed, with the path and what is wrong."""

    def __init__(self, path: str | Path, problem: str, *, subject: str | None = None):
        self.path = str(path)
        self.problem = problem
        self.subject = subject
        who = f"subject {subject}: " if subject else ""
        super().__init__(f"{who}{self.path}: {problem}")


class ConfigError(MedtxError):
    """A config value that fails validation; the message names the key."""


class CohortError(MedtxError):
    """Several problems found across a cohort, reported at once."""

    def __init__(self, problems: list[str], *, what: str = "cohort"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {what}:\n{lines}")


class ToolNotFoundError(MedtxError):
    """An external program (FSL's bet/flirt) that is not installed."""


class ToolFailedError(MedtxError):
    """An external program (FSL's bet/flirt) that failed on a scan.

    nipype reports a failed command as a many-line exception holding all its
    output; the user needs one line: which step, on which file, and what the
    program said last.
    """

    def __init__(
        self,
        tool: str,
        path: str | Path,
        problem: str,
        *,
        step: str | None = None,
        scan: str | None = None,
    ):
        self.tool = tool
        self.path = str(path)
        self.problem = problem
        self.step = step
        self.scan = scan
        where = ", ".join(w for w in (scan and f"scan {scan}", step and f"step {step}") if w)
        super().__init__(f"{where + ': ' if where else ''}{tool} failed on {self.path}: {problem}")
