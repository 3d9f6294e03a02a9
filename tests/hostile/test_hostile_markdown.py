"""Free text in the Markdown reports renders as text, never as HTML or a link.

Issue 31: a site name such as ``<img src=x onerror=alert(1)>`` went from a scan
table into model_card.md, the subgroup tables and summary.md as written, and a
CommonMark renderer made it a live element; ``[x](javascript:...)`` a link, ``|`` a
new table cell, a newline a new block. Every report is rendered here with
markdown-it (CommonMark, GFM tables and strikethrough), its link check switched off
as a renderer that does not sanitize would have it, and the HTML parsed: only the
elements medtx writes may appear, no event attribute, no ``javascript:`` link, and
each free-text value reads back as itself.
"""

from __future__ import annotations

import html
import string
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
import torch

from medtx.errors import MedtxError
from medtx.evaluate import tables
from medtx.evaluate.cards import build_model_card
from medtx.evaluate.subgroups import read_scan_tables
from medtx.evaluate.summary import evaluate_runs
from medtx.evaluate.tables import table3 as real_table3
from tests.unit.evaluate.test_cards import DS, SETTINGS, TEST, TRAIN, regression_run, scan_table
from tests.unit.evaluate.test_tables import MT

markdown_it = pytest.importorskip("markdown_it")

HOSTILE = [
    "<img src=x onerror=alert(1)>",
    "<script>alert(2)</script>",
    "[click](javascript:alert(3))",
    "![pic](javascript:alert(4))",
    "<javascript:alert(5)>",
    "a|b *c* _d_ `e` ~~f~~ \\",
    "x\n<img src=y onerror=alert(6)>\n# head",
    "&lt;img src=z onerror=alert(7)&gt; &amp;",
]
NORMAL = "Site_A (Lyon) & co. 1.5T, n=3 < 5"
# What medtx itself writes: headings, lists, tables, bold captions, code spans (hashes),
# links (cards) and images (figures).
ALLOWED = {"h1", "h2", "h3", "p", "ul", "li", "table", "thead", "tbody", "tr", "th", "td"}
ALLOWED |= {"strong", "code", "a", "img"}
BLOCKS = {"h1", "h2", "h3", "p", "li", "th", "td"}


def shown(value: str) -> str:
    """How a value reads once rendered: one line, outer spaces dropped."""
    return " ".join(value.replace("\r", "\n").split("\n")).strip()


class Rendered(HTMLParser):
    """The elements of rendered HTML and the text of each block (cells, items, ...)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.blocks: list[str] = []
        self._open: list[list[str]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag in BLOCKS:
            self._open.append([])

    def handle_endtag(self, tag):
        if tag in BLOCKS and self._open:
            self.blocks.append("".join(self._open.pop()).strip())

    def handle_data(self, data):
        for block in self._open:
            block.append(data)


def render(text: str) -> Rendered:
    md = markdown_it.MarkdownIt("commonmark").enable(["table", "strikethrough"])
    md.validateLink = lambda url: True  # as a renderer that does not sanitize links
    page = Rendered()
    page.feed(md.render(text))
    return page


def assert_inert(text: str, where: str) -> Rendered:
    """No element medtx does not write, no event handler, no javascript: target."""
    page = render(text)
    for tag, attrs in page.tags:
        assert tag in ALLOWED, f"{where}: <{tag} {attrs}> from {text!r}"
        assert not [a for a in attrs if a.startswith("on")], f"{where}: <{tag} {attrs}>"
        for key in ("href", "src"):
            target = html.unescape(attrs.get(key) or "").strip().lower()
            assert not target.startswith("javascript"), f"{where}: <{tag} {attrs}>"
        if tag == "img":
            assert str(attrs.get("src")).endswith(".png"), f"{where}: <{tag} {attrs}>"
    return page


def study(results: Path) -> tuple[list[Path], Path]:
    """Two folds of a regression run whose scan table names hostile sites: every
    training site is one, and the test subjects split into a normal site and the
    worst, hostile one (t6-t11 have the largest errors)."""
    table = scan_table()
    sites = {subject: HOSTILE[i % len(HOSTILE)] for i, (subject, _) in enumerate(TRAIN)}
    sites["tr9"] = NORMAL
    sites |= {subject: NORMAL if int(subject[1:]) < 6 else HOSTILE[0] for subject, _ in TEST}
    table["site"] = [sites.get(s, NORMAL) for s in table["subject"]]
    path = results / "scans" / f"{DS}.tsv"
    path.parent.mkdir(parents=True)
    table.to_csv(path, sep="\t", index=False)
    assert set(read_scan_tables([path])["site"]) == {*HOSTILE, NORMAL}  # read back whole
    runs = [regression_run(results, fold) for fold in (0, 1)]
    ckpt = torch.load(runs[0].parent / "model.pt", weights_only=False)
    ckpt["metadata"].update(backend=HOSTILE[0], selected_by=HOSTILE[2], preprocess_hash=HOSTILE[5])
    torch.save(ckpt, runs[0].parent / "model.pt")
    return runs, path


def test_a_model_card_shows_hostile_sites_and_records_as_text(tmp_path):
    runs, scans = study(tmp_path / "results")
    card = build_model_card(
        runs[0].parent, attributes=read_scan_tables([scans]), subgroup_settings=SETTINGS
    )
    page = assert_inert(card.text, "model_card.md")
    for value in [*HOSTILE, NORMAL]:
        assert shown(value) in page.blocks, (value, page.blocks)  # a table cell of its own
    sites = next(b for b in page.blocks if b.startswith("Trained on"))
    assert all(shown(v) in sites for v in [*HOSTILE, NORMAL]), sites
    assert f"preprocessing backend: {HOSTILE[0]}" in page.blocks
    assert f"selected by: {HOSTILE[2]}" in page.blocks
    assert f"preprocessing hash: {shown(HOSTILE[5])}" in page.blocks


def test_summary_subgroup_tables_and_cards_written_by_evaluate_are_inert(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "table3", lambda rows=None: real_table3(rows=[]))
    runs, scans = study(tmp_path / "results")
    out = tmp_path / "tables"
    summary = evaluate_runs(runs, out, attributes=[scans], subgroup_config={"bootstrap": 50})
    written = [summary, out / "subgroups_regression.md", out / "model_cards.md"]
    written += [p.parent / "model_card.md" for p in runs] + sorted(out.glob("table*.md"))
    for path in written:
        assert_inert(path.read_text(), path.name)
    page = render(summary.read_text())
    worst = [b for b in page.blocks if "site: worst group" in b]
    assert worst and all(f"worst group {HOSTILE[0]}, MAE" in b for b in worst), worst
    assert NORMAL in page.blocks and HOSTILE[0] in page.blocks  # subgroup table cells
    # the study card still links every fold's card
    links = [a["href"] for t, a in render((out / "model_cards.md").read_text()).tags if t == "a"]
    assert sorted((out / str(h)).resolve() for h in links) == sorted(
        (p.parent / "model_card.md").resolve() for p in runs
    )


def test_a_table_file_keeps_one_cell_per_value(tmp_path):
    df = pd.DataFrame({"site": [*HOSTILE, NORMAL], "n": range(len(HOSTILE) + 1)})
    _, md = tables.write_table(df, tmp_path / "t.tsv", tmp_path / "t.md", caption="Cap.")
    page = assert_inert(md.read_text(), "t.md")
    cells = page.blocks[page.blocks.index("n") + 1 :]
    assert cells == [c for v, n in zip(df["site"], df["n"]) for c in (shown(v), str(n))]
    assert pd.read_csv(tmp_path / "t.tsv", sep="\t")["site"].tolist() == df["site"].tolist()


TEXTS = [
    t
    for c in string.punctuation
    for t in (c, f"a{c}b", f"{c}x{c}", f"x {c}{c} y{c}", f"{c}{c}{c}a", f"é{c}é")
] + ["<a href='javascript:x'>y</a>", "<!-- c -->", "&copy; &#60; &#x3C;", "a\\\\|b", "x_y_z"]


@pytest.mark.parametrize("where", ["- key: {}", "| head |\n|:---|\n| {} |"])
def test_md_text_reads_as_itself_in_a_list_item_and_a_table_cell(where):
    """Every ASCII punctuation character, alone, doubled, around words: the rendered text
    is the value, and nothing but the list or table around it is made."""
    for text in TEXTS:
        page = render(where.format(tables.md_text(text)))
        tags = {t for t, _ in page.tags}
        assert tags <= {"ul", "li", "table", "thead", "tbody", "tr", "th", "td"}, (text, tags)
        block = page.blocks[-1]
        assert block == (f"key: {text}" if where.startswith("-") else text), (text, block)


@pytest.mark.parametrize("stage", ["<img src=x onerror=alert(1)>", "../../../escaped", "a b"])
def test_a_pretraining_stage_name_that_is_no_name_is_refused(tmp_path, stage):
    """The stage names figure files and summary lines: "../../../escaped" wrote
    tables/escaped_loss.png, outside tables/pretrain, and "<img ...>" reached summary.md."""
    ckpt = tmp_path / "ck.pt"
    meta = {"stage": f"pretrain_{stage}", "model_kwargs": {"backbone": MT}}
    torch.save({"metadata": meta, "history": [{"epoch": 0, "train_loss": 1.0}]}, ckpt)
    with pytest.raises(MedtxError) as err:
        evaluate_runs([], tmp_path / "tables", pretrain=[ckpt])
    assert str(err.value) == (
        f"{ckpt}: metadata stage {'pretrain_' + stage!r} is not pretrain_<stage> with a "
        "stage name of letters, digits and _"
    )
    assert not (tmp_path / "tables").exists() and not (tmp_path / "escaped_loss.png").exists()


def test_an_init_record_reaches_the_card_as_text(tmp_path):
    """The checkpoint a model was initialised from, its stage and the parts loaded come
    from the checkpoint's metadata: the card's template prints them through ``md``."""
    runs, scans = study(tmp_path / "results")
    path = runs[0].parent / "model.pt"
    ckpt = torch.load(path, weights_only=False)
    ckpt["metadata"]["init"] = {
        "init": HOSTILE[2],
        "init_stage": HOSTILE[0],
        "init_sha256": HOSTILE[5],
        "loaded": [HOSTILE[1], HOSTILE[3]],
    }
    torch.save(ckpt, path)
    card = build_model_card(
        runs[0].parent, attributes=read_scan_tables([scans]), subgroup_settings=SETTINGS
    )
    page = assert_inert(card.text, "model_card.md")
    (init,) = [b for b in page.blocks if b.startswith("init: ")]
    assert init == (
        f"init: pretrained, initialised from {HOSTILE[2]} (stage {HOSTILE[0]}, sha256 "
        f"{shown(HOSTILE[5])}; parts loaded: {HOSTILE[1]}, {HOSTILE[3]})"
    )


def test_a_pretraining_checkpoint_name_reaches_the_summary_as_text(tmp_path, monkeypatch):
    """The checkpoint's file name is free text (the stage name is checked, the file's
    name is not): the summary's template prints it, and its figures' names, through
    ``md``."""
    monkeypatch.setattr(tables, "table3", lambda rows=None: real_table3(rows=[]))
    runs, _ = study(tmp_path / "results")
    ckpt = tmp_path / f"{HOSTILE[0]} {HOSTILE[2]}.pt"
    meta = {"stage": "pretrain_masked", "model_kwargs": {"backbone": MT}}
    torch.save({"metadata": meta, "history": [{"epoch": 0, "train_loss": 1.0}]}, ckpt)
    summary = evaluate_runs(runs, tmp_path / "tables", pretrain=[ckpt])
    page = assert_inert(summary.read_text(), "summary.md")
    assert f"masked: 1 epoch(s), final train loss 1 ({ckpt.name})" in page.blocks
