"""Free text in the HTML provenance report renders as text, never as markup.

The report's templates escape every value they print (Jinja2 autoescape); nothing in
the Python escapes by hand any more. Hostile values are planted wherever a record, a
scan table or the config reaches the page (dataset, subject, site, session, tool
version, command, QC failure, exclusion, thumbnail path, title), then the pages are
parsed: only the page's own script, no event attribute, no ``javascript:`` target, no
image but the thumbnails, and each value reads back as itself.
"""

from __future__ import annotations

import html
from html.parser import HTMLParser

from medtx.provenance.report import assets_dir, build_report
from tests.unit.provenance.test_report import SETTINGS, synthetic_cohort

HOSTILE = [
    "<img src=x onerror=alert(1)>",
    "*bold* [link](javascript:x)",
    "<script>alert('s')</script>",
    '" onmouseover="alert(2)',
    "&lt;b&gt; &amp;",
]


class Page(HTMLParser):
    """The elements of a page and its text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    return page


def assert_inert(text: str, where: str) -> Page:
    page = parse(text)
    for tag, attrs in page.tags:
        assert not [a for a in attrs if a.startswith("on")], f"{where}: <{tag} {attrs}>"
        for key in ("href", "src"):
            target = html.unescape(attrs.get(key) or "").strip().lower()
            assert not target.startswith("javascript"), f"{where}: <{tag} {attrs}>"
        if tag == "img":
            assert attrs.get("class") == "thumb", f"{where}: <{tag} {attrs}>"
    scripts = [a for t, a in page.tags if t == "script"]
    assert len(scripts) == (1 if where == "report.html" else 0), where
    return page


def hostile_cohort(root):
    records, sites = synthetic_cohort(root, 6, fail={1})
    for k, record in enumerate(records):
        evil = HOSTILE[k % len(HOSTILE)]
        record["dataset"] = f"ds {evil}"
        record["subject"] = evil
        record["session"] = evil
        record["steps"][0]["tool"] = {"name": evil, "version": evil}
        record["steps"][0]["command"] = f"bet {evil}"
        record["qc_failures"] = [f"failure {evil}"] if record.get("qc_failures") else []
    sites = {(r["dataset"], r["scan"]): HOSTILE[k % len(HOSTILE)] for k, r in enumerate(records)}
    exclusions = [
        {"dataset": "ds", "subject": evil, "session": None, "path": evil, "reason": evil}
        for evil in HOSTILE
    ]
    return records, sites, exclusions


def test_hostile_values_reach_the_report_as_text(tmp_path):
    records, sites, exclusions = hostile_cohort(tmp_path)
    out = build_report(
        records,
        exclusions,
        SETTINGS,
        tmp_path / "out" / "report.html",
        base_dir=tmp_path,
        sites=sites,
        title=HOSTILE[0],
    )
    page = assert_inert(out.read_text(), "report.html")
    text = "".join(page.text)
    for evil in HOSTILE:
        assert evil in text, evil  # shown as written (the dataset, site and command cells)
        assert f"bet {evil}" in text and f"ds {evil}" in text
    assert "failure " + HOSTILE[1] in text  # the failed scan's reason
    assert "<title>&lt;img src=x onerror=alert(1)&gt;</title>" in out.read_text()


def test_hostile_values_stay_inert_on_the_per_scan_pages(tmp_path):
    records, sites, exclusions = hostile_cohort(tmp_path)
    out = build_report(
        records,
        exclusions,
        SETTINGS,
        tmp_path / "out" / "report.html",
        base_dir=tmp_path,
        sites=sites,
        inline_details_bytes=0,
    )
    pages = sorted((assets_dir(out) / "scans").glob("*.html"))
    assert len(pages) == len(records)
    for path in pages:
        text = "".join(assert_inert(path.read_text(), path.name).text)
        assert any(f"bet {evil}" in text for evil in HOSTILE), path.name
