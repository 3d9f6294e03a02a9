"""Hashes of the medtx code each workflow stage runs, derived from its imports.

Snakemake's code trigger sees a rule's own shell line, not the modules that
line imports. Each rule therefore carries ``code=code_hash(stage)`` in its
params. A stage names only its entry module(s) (``STAGE_ENTRIES``); the hash
covers every medtx module they import, directly or through others, read from
the source with ``ast``: imports inside functions count too, and so do the
``__init__.py`` of each package on the way (Python runs them on import). A new
import is covered without anyone listing it, and an edit reruns exactly the
stages whose closure holds the edited file.

``cli.py`` is in no closure: it only parses arguments and calls one library
function per command (the rules' shell lines, which Snakemake sees, carry the
arguments).
"""

from __future__ import annotations

import ast
import functools
import hashlib
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent
ROOT = "medtx"

# The module(s) whose function each stage's command calls. Everything they
# import is found from here.
STAGE_ENTRIES: dict[str, tuple[str, ...]] = {
    "demo": ("medtx.data.demo",),
    "bet": ("medtx.preprocess.bet",),
    "flirt": ("medtx.preprocess.flirt",),
    "n4": ("medtx.preprocess.n4",),
    "pool_normalize": ("medtx.preprocess.intensity",),
    # a scan's whole T1 chain in one job (preprocess/job_per: scan): the chain
    # calls each step's module by name (medtx.preprocess.steps), so they are listed
    "chain": (
        "medtx.preprocess.chain",
        "medtx.preprocess.bet",
        "medtx.preprocess.flirt",
        "medtx.preprocess.n4",
        "medtx.preprocess.intensity",
    ),
    "brats": ("medtx.preprocess.brats",),
    "collect": ("medtx.provenance.collect",),
    "record_list": ("medtx.workflow.argfile",),
    # the dataset's hash covers the chain that made its images (GeneratedBy)
    "derivatives": (
        "medtx.preprocess.derivatives",
        "medtx.preprocess.bet",
        "medtx.preprocess.flirt",
        "medtx.preprocess.n4",
        "medtx.preprocess.intensity",
    ),
    "deface": ("medtx.share.deface",),
    "report": ("medtx.provenance.report", "medtx.provenance.run_index"),
    "folds": ("medtx.folds.manifest",),
    # its own stage: it reads received encoder bundles, and its reruns retrain nothing
    "firewall": ("medtx.folds.firewall",),
    "cache_index": ("medtx.data.cache",),
    "pretrain": ("medtx.train.pretrain",),
    "pretrain_pumit": ("medtx.train.mim",),
    "finetune": ("medtx.train.finetune",),
    "evaluate": ("medtx.evaluate.summary",),
    "predict": ("medtx.predict.run",),
}


def module_file(name: str) -> Path | None:
    """The source file of medtx module ``name`` (a module or a package), or None."""
    parts = name.split(".")
    if parts[0] != ROOT:
        return None
    base = PACKAGE.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


@functools.cache
def imported_modules(name: str) -> frozenset[str]:
    """The medtx modules that module ``name`` imports anywhere in its source
    (parsed once per process: the stages' closures share most modules)."""
    path = module_file(name)
    if path is None:
        raise KeyError(f"no medtx module {name!r}")
    found: set[str] = set()
    for node in _statements(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing module's package
                anchor = _package_of(name, path).split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            # `from medtx.models import slice_transformer` imports a module by name
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return frozenset(m for m in found if m.split(".")[0] == ROOT and module_file(m) is not None)


# Nodes that hold statements: an import is a statement, and expressions hold none,
# so the walk skips them (nine in ten nodes of a module).
_HOLDERS = (ast.stmt, ast.excepthandler, ast.match_case)


def _statements(tree: ast.Module) -> Iterator[ast.AST]:
    """Every statement of ``tree``, at any depth (function and class bodies too),
    and the except clauses and match cases that hold some."""
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        yield node
        todo.extend(c for c in ast.iter_child_nodes(node) if isinstance(c, _HOLDERS))


def _with_packages(name: str) -> set[str]:
    """``name`` and every package above it (their ``__init__`` runs on import)."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


@functools.cache
def closure(entries: tuple[str, ...]) -> tuple[str, ...]:
    """Every medtx module that importing ``entries`` can run, sorted."""
    seen: set[str] = set()
    todo = [m for e in entries for m in _with_packages(e)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        if module_file(name) is None:
            raise KeyError(f"no medtx module {name!r}")
        seen.add(name)
        for imported in imported_modules(name):
            todo.extend(_with_packages(imported) - seen)
    return tuple(sorted(seen))


RENDERER = "medtx.pages"  # renders a package's templates/ (medtx.pages: PackageLoader)


def stage_files(stage: str) -> list[str]:
    """The source files (relative to the package's parent) in ``stage``'s hash."""
    if stage not in STAGE_ENTRIES:
        raise KeyError(f"no code entry for stage {stage!r}; known: {sorted(STAGE_ENTRIES)}")
    modules = closure(STAGE_ENTRIES[stage])
    files = {f for m in modules if (f := module_file(m)) is not None}
    # A module that renders pages (it imports medtx.pages) runs its package's
    # templates (the report's page, the model cards): they are its code too.
    for m in modules:
        if RENDERER in imported_modules(m) and (f := module_file(m)) is not None:
            files |= {p for p in (f.parent / "templates").rglob("*") if p.is_file()}
    return sorted(str(f.relative_to(PACKAGE.parent)) for f in files)


def _digest(rels: list[str]) -> str:
    """sha256 (first 16 hex digits) over each file's path (relative to the package's
    parent) and bytes, in the order given."""
    h = hashlib.sha256()
    for rel in rels:
        h.update(rel.encode())
        h.update((PACKAGE.parent / rel).read_bytes())
    return h.hexdigest()[:16]


@functools.cache
def code_hash(stage: str) -> str:
    """The digest of the sorted source files of ``stage``'s closure."""
    return _digest(stage_files(stage))


def package_hash() -> str:
    """The digest of every medtx source file: ``medtx --version``'s code hash, which
    tells two checkouts of one version apart."""
    files = [*PACKAGE.rglob("*.py"), *PACKAGE.rglob("templates/**/*")]
    return _digest(sorted(str(p.relative_to(PACKAGE.parent)) for p in files if p.is_file()))
