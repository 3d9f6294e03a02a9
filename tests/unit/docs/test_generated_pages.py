"""The generated documentation pages (docs/generate.py): never stale, never missing a key.

A schema key the configuration page lacks, a bench figure without its commit and
machine, or a committed page that differs from what ``make docs`` writes fails here.
"""

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen():
    return load("docs_generate", REPO / "docs" / "generate.py")


@pytest.fixture(scope="module")
def record():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        return load("bench_record", REPO / "bench" / "record.py")
    finally:
        sys.path.remove(str(REPO / "bench"))


def missing_keys(schema: dict, page: str, gen) -> list[str]:
    """Schema key paths (and training keys) that have no row on ``page``."""
    paths = [path for path, _ in gen.schema_keys(schema)]
    paths += list(schema["$defs"]["training"]["properties"])
    return [p for p in paths if f"| `{p}` |" not in page]


def test_every_committed_generated_page_is_current(gen):
    stale = [
        str(path.relative_to(REPO))
        for path, text in gen.pages().items()
        if not path.exists() or path.read_text() != text
    ]
    assert not stale, f"stale generated pages {stale}: run `make docs` (docs/generate.py)"


def test_the_configuration_page_has_a_row_for_every_schema_key(gen):
    schema = yaml.safe_load(gen.SCHEMA.read_text())
    page = gen.CONFIG_PAGE.read_text()
    assert len(gen.schema_keys(schema)) > 100
    assert not missing_keys(schema, page, gen)


def test_a_key_added_to_the_schema_is_missing_from_the_committed_page(gen):
    schema = copy.deepcopy(yaml.safe_load(gen.SCHEMA.read_text()))
    schema["properties"]["qc"]["properties"]["new_threshold"] = {"type": "number", "default": 1}
    schema["$defs"]["training"]["properties"]["new_rate"] = {"type": "number"}
    page = gen.CONFIG_PAGE.read_text()
    assert missing_keys(schema, page, gen) == ["qc/new_threshold", "new_rate"]


def test_each_row_shows_the_schemas_default_and_bounds(gen):
    page = gen.CONFIG_PAGE.read_text()
    schema = yaml.safe_load(gen.SCHEMA.read_text())
    n4 = schema["properties"]["preprocess"]["properties"]["n4"]["properties"]["shrink_factor"]
    row = next(
        line for line in page.splitlines() if line.startswith("| `preprocess/n4/shrink_factor` |")
    )
    assert (
        f"`{n4['default']}`" in row and f"≥ {n4['minimum']}" in row and f"≤ {n4['maximum']}" in row
    )


def test_training_defaults_come_from_the_code_per_backbone(gen):
    from medtx.train.config import defaults

    page = gen.CONFIG_PAGE.read_text()
    row = next(line for line in page.splitlines() if line.startswith("| `mask_ratio` |"))
    mt, pumit = defaults("medical_transformer")["mask_ratio"], defaults("pumit")["mask_ratio"]
    assert mt != pumit and row.split(" | ")[2:4] == [f"`{mt}`", f"`{pumit}`"]


def test_a_bench_without_its_json_reads_not_yet_measured(gen, tmp_path):
    page = gen.bench_page("dag", tmp_path)
    assert "Not yet measured: `bench/results/dag.json` is absent." in page
    assert "not yet measured" in gen.bench_index(tmp_path)


def test_a_bench_record_renders_with_its_commit_date_and_machine(gen, record, tmp_path):
    rows = [{"method": "deepbet", "Dice": 0.9681, "CPU s": 9.0}]
    record.write_record(
        "extraction",
        {"per method": rows, "totals": {"scans": 3, "wall s": 40.5}},
        tmp_path / "extraction.json",
        notes=["truth: the reference mask"],
        argv=["bench/extraction.py", "--transforms", "1"],
    )
    machine = json.loads((tmp_path / "extraction.json").read_text())["machine"]
    assert machine["cores"] >= 1 and machine["cpu_model"] and len(machine["commit"]) >= 40
    page = gen.bench_page("extraction", tmp_path)
    assert f"| commit | `{machine['commit']}` |" in page
    assert f"| date (UTC) | {machine['date']} |" in page
    assert f"| CPU | {machine['cpu_model']} |" in page
    assert f"| cores | {machine['cores']} " in page
    assert "`python bench/extraction.py --transforms 1`" in page
    assert "| deepbet | 0.9681 | 9 |" in page and "| scans | 3 |" in page
    assert "truth: the reference mask" in page
    assert machine["date"][:10] in gen.bench_index(tmp_path)


def test_a_file_that_is_not_a_bench_record_is_one_line_naming_it(gen, tmp_path):
    (tmp_path / "train.json").write_text(json.dumps({"sections": {}}))
    with pytest.raises(SystemExit, match=r"train\.json: not a bench record"):
        gen.bench_page("train", tmp_path)


def test_the_readme_is_a_front_door():
    """At most 150 lines; the two commands, the own-data config and SLURM in its first screen."""
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 150
    first = "\n".join(lines[:40])
    for needed in (
        "make demo",
        "make test",
        "datasets:",
        "--configfile my.yaml",
        "--profile slurm",
    ):
        assert needed in first, needed


def test_every_page_in_docs_is_in_the_nav():
    """mkdocs --strict warns on a page left out; here too, without building the site."""
    nav = (REPO / "mkdocs.yml").read_text()
    pages = [p.relative_to(REPO / "docs").as_posix() for p in (REPO / "docs").rglob("*.md")]
    assert pages and not [p for p in pages if p not in nav]


@pytest.mark.parametrize("page", ["README.md", "docs/your-data.md"])
def test_the_own_data_configs_shown_are_valid(page):
    """The config a new user copies first must pass the schema as written."""
    import re

    from medtx.config import validate_config

    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / page).read_text(), re.S)
    configs = [yaml.safe_load(b) for b in blocks if b.lstrip().startswith(("datasets:", "# "))]
    configs = [c for c in configs if isinstance(c, dict) and "datasets" in c]
    assert configs, f"{page}: no own-data config shown"
    for config in configs:
        validate_config(config)
