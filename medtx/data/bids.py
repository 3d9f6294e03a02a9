"""Which BIDS images a dataset takes: file-name entities, filters, selection.

A BIDS subject may hold several T1w images: ``run-1``/``run-2``, two ``acq-``
values, ``.nii`` beside ``.nii.gz``, a session-less image beside sessions.
Taking the alphabetically first one and saying nothing is how a study ends up
on the wrong scans, so the config says which images to take
(``datasets/<name>/select``) and every image found gets a verdict: taken,
skipped (with the reason, e.g. ``run-1 not selected (runs: last)``) or a
problem (an ambiguity only the config can settle).

The vocabulary is pybids' and snakebids': entity keys as they appear in file
names (``acq``, ``ce``, ``rec``, ``run``, ...; pybids' long names such as
``acquisition`` are accepted too), and a filter value is one value, a list of
values, ``true`` (the entity must be present) or ``false`` (absent), as
snakebids' ``pybids_inputs`` filters and pybids' ``Query.ANY``/``Query.NONE``.
Runs compare as integers (pybids does too: ``run: 1`` matches ``run-01``).

Why by hand and not pybids: medtx needs one suffix (``T1w``) in one datatype
(``anat``), and pybids would bring SQLAlchemy and a layout index built over the
whole tree (every func and dwi file too) at each workflow parse. Entities are
``key-value`` pairs joined by ``_`` before the suffix (BIDS specification,
"Filenames"), which takes a few lines to parse and check here.

Files the dataset's ``.bidsignore`` names are not looked at, as the BIDS
validator does not look at them (gitignore patterns relative to the dataset
root; ``BidsIgnore``). File names are case-sensitive in BIDS: an image named
``*_T1w.NII.GZ`` or ``*_t1w.nii`` is found, and refused with the name to use.

Order of selection, per subject: images outside ``ses-*`` while the subject
has session images (BIDS: all of a subject's data in sessions or none), entity
filters, ``sessions``, ``prefer_extension``, ``runs`` (among images that differ
only in their run); any two images still left for one scan are a problem that
names the entity they differ in.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medtx.errors import ConfigError, MedtxError

# BIDS entities in the specification's order: file-name key -> pybids name.
ENTITIES = {
    "sub": "subject",
    "ses": "session",
    "sample": "sample",
    "task": "task",
    "tracksys": "tracksys",
    "acq": "acquisition",
    "nuc": "nucleus",
    "voi": "volume",
    "ce": "ceagent",
    "trc": "tracer",
    "stain": "staining",
    "rec": "reconstruction",
    "dir": "direction",
    "run": "run",
    "mod": "modality",
    "echo": "echo",
    "flip": "flip",
    "inv": "inversion",
    "mt": "mtransfer",
    "part": "part",
    "proc": "processing",
    "hemi": "hemisphere",
    "space": "space",
    "split": "split",
    "recording": "recording",
    "chunk": "chunk",
    "seg": "segmentation",
    "res": "resolution",
    "den": "density",
    "label": "label",
    "desc": "description",
}
LONG_NAMES = {long: key for key, long in ENTITIES.items()}
# Entities whose values are indices (non-negative integers) in the specification.
INDEX_ENTITIES = ("run", "echo", "flip", "inv", "split", "chunk")
SUFFIX = "T1w"
EXTENSIONS = (".nii.gz", ".nii")
RUNS = ("first", "last", "all")
SESSIONS = ("all", "first")
# What a dataset takes when its config says nothing: every session, the first
# run (what medtx took before runs could be chosen, so existing results keep
# their inputs), and .nii.gz over .nii. Written here only; the schema refers here.
DEFAULTS: dict[str, Any] = {
    "filters": {},
    "runs": "first",
    "sessions": "all",
    "prefer_extension": ".nii.gz",
}
ENTITY_PATTERN = re.compile(r"^(?P<key>[a-zA-Z]+)-(?P<value>[a-zA-Z0-9]+)$")


@dataclass(frozen=True)
class BidsImage:
    """One image file and the entities its name holds."""

    path: Path
    entities: dict[str, str]
    extension: str

    @property
    def session(self) -> str | None:
        return self.entities.get("ses")

    @property
    def run(self) -> str | None:
        return self.entities.get("run")

    def label(self, key: str) -> str:
        """``key-value`` as in the file name, or ``no <key>``."""
        value = self.entities.get(key)
        return f"{key}-{value}" if value is not None else f"no {key}"


def parse_name(name: str) -> tuple[dict[str, str], str, str]:
    """(entities, suffix, extension) of a BIDS file name; ValueError says what is wrong."""
    extension = next((e for e in EXTENSIONS if name.lower().endswith(e)), None)
    if extension is None:
        raise ValueError(f"extension is not one of {', '.join(EXTENSIONS)}")
    written = name[len(name) - len(extension) :]
    if written != extension:
        # nibabel and ANTs would read it, but medtx.io and FSL's bet/flirt see no NIfTI.
        raise ValueError(
            f"the extension {written!r} must be lowercase (BIDS names are case-sensitive; "
            f"medtx and FSL read .nii.gz and .nii only); "
            f"rename it {name[: -len(extension)]}{extension}"
        )
    *pairs, suffix = name[: -len(extension)].split("_")
    entities: dict[str, str] = {}
    for pair in pairs:
        match = ENTITY_PATTERN.match(pair)
        if not match:
            raise ValueError(f"{pair!r} is not a key-value entity (key-[A-Za-z0-9])")
        key = match["key"]
        if key not in ENTITIES:
            raise ValueError(f"{key!r} is not a BIDS entity")
        if key in entities:
            raise ValueError(f"entity {key!r} appears twice")
        if key in INDEX_ENTITIES and not match["value"].isdigit():
            raise ValueError(f"{pair!r}: {key} is an index, a number")
        entities[key] = match["value"]
    if not pairs or "sub" not in entities:
        raise ValueError("no sub-<label> entity")
    return entities, suffix, extension


def read_image(path: Path) -> BidsImage:
    """The image at ``path`` with its entities; ValueError when its name is no T1w's."""
    entities, suffix, extension = parse_name(path.name)
    if suffix != SUFFIX:
        fixed = path.name[: -len(extension) - len(suffix)] + SUFFIX + extension
        raise ValueError(
            f"the suffix {suffix!r} must be written {SUFFIX} (BIDS names are case-sensitive); "
            f"rename it {fixed}"
        )
    return BidsImage(path, entities, extension)


def find_images(subject_dir: Path, ignore: BidsIgnore | None = None) -> list[Path]:
    """Every ``*_T1w.nii[.gz]`` under ``anat/`` of a subject, sessions included.

    Names are matched in any case so that ``sub-01_T1w.NII.GZ`` is found and
    refused by name (``read_image``) rather than leaving the subject with "no
    T1w". Hidden files (``._sub-01_T1w.nii.gz`` from macOS, editors' backups)
    and what ``ignore`` names are no BIDS files and are not looked at.
    """
    ignored = ignore.ignores if ignore else lambda path, is_dir=False: False
    folders = [subject_dir / "anat"]
    folders += [
        p / "anat"
        for p in sorted(subject_dir.glob("ses-*"))
        if p.is_dir() and not ignored(p, is_dir=True)
    ]
    ends = tuple(f"_{SUFFIX}{ext}".lower() for ext in EXTENSIONS)
    return sorted(
        path
        for folder in folders
        if folder.is_dir() and not ignored(folder, is_dir=True)
        for path in folder.iterdir()
        if path.name.lower().endswith(ends)
        and not path.name.startswith(".")
        and path.is_file()
        and not ignored(path)
    )


def data_folders(folder: Path, ignore: BidsIgnore | None = None) -> list[str]:
    """The datatype folders (anat, func, meg, ...) of a subject or session folder.

    Says what a subject without a T1w holds instead (``sub-emptyroom``: meg).
    """
    ignored = ignore.ignores if ignore else lambda path, is_dir=False: False
    places = [folder] + sorted(p for p in folder.glob("ses-*") if p.is_dir())
    return sorted(
        {
            p.name
            for place in places
            if not ignored(place, is_dir=True)
            for p in place.iterdir()
            if p.is_dir() and not p.name.startswith((".", "ses-")) and not ignored(p, is_dir=True)
        }
    )


class BidsIgnore:
    """A dataset's ``.bidsignore``: what the BIDS validator, and medtx, do not look at.

    The validator reads it with gitignore's rules (npm ``ignore``), so they are
    followed here: ``#`` comments and blank lines, ``*`` and ``?`` within one
    folder, ``**`` across folders, ``[...]`` classes, a trailing ``/`` for folders
    only, a ``/`` at the start or inside for paths from the root (else a name at
    any depth), ``!`` to take a path back (not inside an ignored folder, as git).
    pathspec implements the same but is no dependency of medtx, for thirty lines.
    """

    FILE = ".bidsignore"

    def __init__(self, root: Path, patterns: list[tuple[re.Pattern[str], bool, bool]]):
        self.root = root
        self.patterns = patterns  # (regex on the root-relative path, negated, folders only)

    @classmethod
    def read(cls, root: Path) -> BidsIgnore:
        """``root/.bidsignore``, or no patterns where there is none."""
        path = root / cls.FILE
        if not path.is_file():
            return cls(root, [])
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as err:
            raise MedtxError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
        except OSError as err:
            raise MedtxError(f"{path}: cannot be read ({err.strerror})") from err
        return cls.parse(text.splitlines(), root)

    @classmethod
    def parse(cls, lines: Iterable[str], root: Path) -> BidsIgnore:
        patterns = []
        for line in lines:
            line = line.rstrip("\r\n")
            if not line.endswith("\\ "):
                line = line.rstrip(" \t")
            if not line or line.startswith("#"):
                continue
            negated = line.startswith("!")
            if negated or line.startswith(("\\#", "\\!")):
                line = line[1:]
            folders_only = line.endswith("/")
            line = line.rstrip("/")
            if not line:
                continue
            anchored = "/" in line
            body = _glob_regex(line.lstrip("/"))
            regex = body if anchored else f"(?:.*/)?{body}"
            patterns.append((re.compile(regex, re.DOTALL), negated, folders_only))
        return cls(root, patterns)

    def _match(self, rel: str, is_dir: bool) -> bool | None:
        """True (ignored), False (taken back by ``!``) or None (no pattern says)."""
        verdict = None
        for regex, negated, folders_only in self.patterns:
            if (is_dir or not folders_only) and regex.fullmatch(rel):
                verdict = not negated
        return verdict

    def ignores(self, path: Path, is_dir: bool = False) -> bool:
        """Whether ``path`` (under the root) or a folder above it is ignored."""
        if not self.patterns:
            return False
        try:
            parts = path.relative_to(self.root).parts
        except ValueError:
            return False
        for i in range(1, len(parts)):
            if self._match("/".join(parts[:i]), True):
                return True
        return bool(parts) and bool(self._match("/".join(parts), is_dir))


def _glob_regex(glob: str) -> str:
    """A gitignore glob as a regular expression over a ``/``-separated path."""
    out = []
    i, n = 0, len(glob)
    while i < n:
        c = glob[i]
        if glob.startswith("**", i) and (i == 0 or glob[i - 1] == "/"):
            end = i + 2
            if end == n:  # "a/**": everything inside
                out.append(".*")
                i = end
                continue
            if glob[end] == "/":  # "**/": no folder or any number of them
                out.append("(?:.*/)?")
                i = end + 1
                continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and (close := glob.find("]", i + 2)) != -1:
            inner = glob[i + 1 : close]
            if inner[0] in "!^":
                inner = "^/" + inner[1:]  # like * and ?, never a folder's slash
            out.append("[" + inner.replace("\\", "\\\\") + "]")
            i = close + 1
            continue
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(glob[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


@dataclass(frozen=True)
class Selection:
    """A dataset's ``select`` block, checked: which images it takes."""

    filters: dict[str, Any] = field(default_factory=dict)
    runs: str = DEFAULTS["runs"]
    sessions: str | tuple[str, ...] = DEFAULTS["sessions"]
    prefer_extension: str = DEFAULTS["prefer_extension"]

    @classmethod
    def from_config(cls, select: dict | None, key: str) -> Selection:
        """Check ``select`` (config key ``key``); ConfigError names the key and the choices."""
        select = dict(select or {})
        unknown = sorted(set(select) - set(DEFAULTS))
        if unknown:
            raise ConfigError(
                f"config key '{key}/{unknown[0]}': not a select key; allowed: "
                + ", ".join(DEFAULTS)
            )
        filters: dict[str, Any] = {}
        for name, value in (select.get("filters") or {}).items():
            entity = LONG_NAMES.get(name, name)
            if entity not in ENTITIES or entity in ("sub", "ses"):
                hint = (
                    "sessions are chosen with sessions:"
                    if entity == "ses"
                    else (
                        "use a BIDS entity: "
                        + ", ".join(k for k in ENTITIES if k not in ("sub", "ses"))
                    )
                )
                raise ConfigError(
                    f"config key '{key}/filters/{name}': not an entity to filter on; {hint}"
                )
            filters[entity] = _filter_value(value, f"{key}/filters/{name}")
        runs = select.get("runs", DEFAULTS["runs"])
        if runs not in RUNS:
            raise ConfigError(f"config key '{key}/runs': {runs!r} is not one of {', '.join(RUNS)}")
        sessions = select.get("sessions", DEFAULTS["sessions"])
        if isinstance(sessions, list) and sessions:
            sessions = tuple(str(s).removeprefix("ses-") for s in sessions)
        elif sessions not in SESSIONS:
            raise ConfigError(
                f"config key '{key}/sessions': {sessions!r} is not all, first or a list of sessions"
            )
        prefer = select.get("prefer_extension", DEFAULTS["prefer_extension"])
        if prefer not in EXTENSIONS:
            raise ConfigError(
                f"config key '{key}/prefer_extension': {prefer!r} is not one of "
                + ", ".join(EXTENSIONS)
            )
        return cls(filters=filters, runs=runs, sessions=sessions, prefer_extension=prefer)

    @property
    def session_list(self) -> tuple[str, ...]:
        """The sessions listed in the config (empty for all or first)."""
        return self.sessions if isinstance(self.sessions, tuple) else ()

    def describe_filter(self, entity: str) -> str:
        """``filters: acq: mprage`` as the config wrote it, for a skip reason."""
        value = self.filters[entity]
        shown = str(value).lower() if isinstance(value, bool) else ", ".join(value)
        return f"filters: {entity}: {shown}"


def _filter_value(value: Any, key: str) -> bool | tuple[str, ...]:
    """A filter as True/False (present/absent) or a tuple of accepted values."""
    if isinstance(value, bool):
        return value
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, (str, int)) and str(v) for v in values):
        raise ConfigError(
            f"config key '{key}': {value!r} is not a value, a list of values, true or false"
        )
    return tuple(str(v) for v in values)


def _same(entity: str, a: str, b: str) -> bool:
    """Entity values equal, indices (run, echo, ...) compared as integers."""
    if entity in INDEX_ENTITIES and a.isdigit() and b.isdigit():
        return int(a) == int(b)
    return a == b


def filter_reason(image: BidsImage, sel: Selection) -> str | None:
    """Why a filter leaves ``image`` out, or None when every filter takes it."""
    for entity, wanted in sel.filters.items():
        value = image.entities.get(entity)
        if value is None and wanted is not False:
            return f"no {entity} entity ({sel.describe_filter(entity)})"
        if value is not None and (
            wanted is False
            or (isinstance(wanted, tuple) and not any(_same(entity, value, w) for w in wanted))
        ):
            return f"{entity}-{value} not selected ({sel.describe_filter(entity)})"
    return None


def natural_key(text: str | None) -> tuple:
    """Sort key with digit runs as numbers: ses-2 before ses-10, no run before run-1."""
    if text is None:
        return ()
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part)
        for part in re.findall(r"\d+|\D+", text)
    )


@dataclass
class Verdict:
    """What happens to one image: ``ok``, ``skipped`` or ``problem``, and why."""

    image: BidsImage
    status: str = "ok"
    reason: str = ""


def select_images(images: list[BidsImage], sel: Selection, key: str) -> list[Verdict]:
    """A verdict for every image of one subject (``key``: the select block's config key)."""
    verdicts = [Verdict(image) for image in images]

    def left() -> list[Verdict]:
        return [v for v in verdicts if v.status == "ok"]

    def skip(verdict: Verdict, reason: str) -> None:
        verdict.status, verdict.reason = "skipped", reason

    if any(v.image.session for v in verdicts):
        for v in verdicts:
            if v.image.session is None:
                skip(v, "outside ses-* folders while the subject has sessions")
    for v in left():
        if reason := filter_reason(v.image, sel):
            skip(v, reason)
    if isinstance(sel.sessions, tuple):
        for v in left():
            if v.image.session not in sel.sessions:
                skip(v, f"ses-{v.image.session} not selected (sessions: {', '.join(sel.sessions)})")
    elif sel.sessions == "first" and left():
        first = min((v.image.session for v in left()), key=natural_key)
        for v in left():
            if v.image.session != first:
                skip(v, f"ses-{v.image.session} not selected (sessions: first)")
    by_name: dict[tuple, list[Verdict]] = defaultdict(list)
    for v in left():
        by_name[tuple(v.image.entities.items())].append(v)
    for group in by_name.values():
        if any(v.image.extension == sel.prefer_extension for v in group):
            for v in group:
                if v.image.extension != sel.prefer_extension:
                    skip(
                        v,
                        f"{v.image.extension} beside {sel.prefer_extension} "
                        f"(prefer_extension: {sel.prefer_extension})",
                    )
    if sel.runs != "all":
        by_runs: dict[tuple, list[Verdict]] = defaultdict(list)
        for v in left():
            by_runs[tuple((k, x) for k, x in v.image.entities.items() if k != "run")].append(v)
        for group in by_runs.values():
            pick = min if sel.runs == "first" else max
            keep = pick((v.image.run for v in group), key=natural_key)
            for v in group:
                if not _runs_equal(v.image.run, keep):
                    skip(v, f"{v.image.label('run')} not selected (runs: {sel.runs})")
    by_scan: dict[tuple, list[Verdict]] = defaultdict(list)
    for v in left():
        run = v.image.run if sel.runs == "all" else None
        by_scan[(v.image.session, None if run is None else int(run))].append(v)
    for group in by_scan.values():
        if len(group) > 1:
            _ambiguous(group, key)
    return verdicts


def _runs_equal(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a is b
    return _same("run", a, b)


def _ambiguous(group: list[Verdict], key: str) -> None:
    """Mark images that would all be one scan, naming the entity they differ in.

    ``run-1`` beside ``run-01`` differ only in how the run is written: runs
    compare as numbers (pybids too), so no filter or ``runs`` choice can keep one
    of them, and the line names the fixes that can.
    """
    first = group[0].image.entities
    differ = [k for k in ENTITIES if any(v.image.entities.get(k) != first.get(k) for v in group)]
    if differ in ([], ["run"]):
        runs = " and ".join(v.image.label("run") for v in group)
        why = (
            f"{runs} are one run (runs compare as numbers), which no select key can tell "
            "apart; rename or remove one, or list one in the dataset's .bidsignore"
        )
        for v in group:
            v.status = "problem"
            v.reason = f"{v.image.path}: {len(group)} images left for one scan: {why}"
        return
    values = ", ".join(v.image.label(differ[0]) for v in group)
    for v in group:
        v.status = "problem"
        v.reason = (
            f"{v.image.path}: {len(group)} images left for one scan, differing in "
            f"{differ[0]} ({values}); choose with config key '{key}/filters/{differ[0]}'"
        )


def unmatched_choices(sel: Selection, images: list[BidsImage], key: str) -> list[str]:
    """Filter values and sessions that no image of the dataset has: typos, named by key."""
    problems = []
    for entity, wanted in sel.filters.items():
        if isinstance(wanted, tuple):
            found = sorted({im.entities[entity] for im in images if entity in im.entities})
            problems += [
                f"config key '{key}/filters/{entity}': no image has {entity}-{w} "
                f"(found: {', '.join(found) or 'none'})"
                for w in wanted
                if not any(_same(entity, f, w) for f in found)
            ]
    if isinstance(sel.sessions, tuple):
        found = sorted({im.session for im in images if im.session}, key=natural_key)
        problems += [
            f"config key '{key}/sessions': no image has ses-{s} "
            f"(found: {', '.join(found) or 'none'})"
            for s in sel.sessions
            if s not in found
        ]
    return problems
