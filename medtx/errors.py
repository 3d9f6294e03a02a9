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
