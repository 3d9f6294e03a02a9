"""The report's sibling folder (``<page stem>_files/``), rebuilt whole on each build.

The entry page stays one small file and links its thumbnails and per-scan pages
into this folder by relative paths, so the page and the folder move or zip
together. Each build fills a hidden folder beside it and swaps it in, so files
of an earlier cohort never linger, and a crash leaves the previous folder (and
at worst a hidden leftover), never a half-filled one. Thumbnails are hard links
(no copy of thousands of PNGs), copies where linking fails (another filesystem).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def assets_dir(out_html: str | Path) -> Path:
    """The folder of the report's thumbnails and per-scan pages: ``<stem>_files``
    beside ``out_html`` (``results/reports/provenance.html`` ->
    ``results/reports/provenance_files``)."""
    out = Path(out_html)
    return out.with_name(f"{out.stem}_files")


def safe_name(*parts: object, limit: int = 80) -> str:
    """A file-name fragment from user data: only ``[A-Za-z0-9._-]``, no leading dot."""
    name = _UNSAFE.sub("_", "_".join(str(p) for p in parts if p not in (None, "")))
    return name.lstrip(".")[:limit] or "scan"


@contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty hidden folder beside ``final``; on success it replaces ``final``
    (the old one removed); on error it is removed and ``final`` is left as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    old = final.with_name(f".{final.name}.{os.getpid()}.old")
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
        if old.exists():
            shutil.rmtree(old)
        if final.is_symlink() or final.is_file():
            final.unlink()
        elif final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
