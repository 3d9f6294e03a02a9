"""A list of paths handed to a command as one ``@FILE`` argument.

The rules that read every scan of a dataset (folds, derivatives, the report,
predictions, the cache index) take the dataset's record list, not each record:
40,000 record paths exceed the kernel's limit on a command line (ARG_MAX, about
2 MiB), and each consuming rule would give Snakemake 40,000 more edges to plan.
``medtx`` reads ``@FILE`` as FILE's lines, one argument each (argparse's
``fromfile_prefix_chars``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from medtx.errors import MedtxError

PREFIX = "@"


def write_argfile(paths: Iterable[str], out: str | Path) -> Path:
    """One path per line, in the order given."""
    lines = [str(p) for p in paths]
    for line in lines:
        if "\n" in line or "\r" in line or line.startswith(PREFIX):
            raise MedtxError(f"{out}: path {line!r} cannot be passed in an argument file")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(f"{line}\n" for line in lines))
    return out
