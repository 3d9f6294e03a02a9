"""BIDS file names, filters and selection (medtx.data.bids), without files on disk."""

from pathlib import Path

import pytest

from medtx.config import load_schema
from medtx.data import bids
from medtx.errors import ConfigError


def test_entities_suffix_and_extension_of_a_name():
    entities, suffix, ext = bids.parse_name("sub-01_ses-2_acq-mprage_run-01_T1w.nii.gz")
    assert entities == {"sub": "01", "ses": "2", "acq": "mprage", "run": "01"}
    assert (suffix, ext) == ("T1w", ".nii.gz")


@pytest.mark.parametrize(
    "name,problem",
    [
        ("sub-01_T1w.mgz", "extension is not one of .nii.gz, .nii"),
        ("sub-0_1_T1w.nii", "'1' is not a key-value entity"),
        ("sub-01_foo-2_T1w.nii", "'foo' is not a BIDS entity"),
        ("sub-01_run-1_run-2_T1w.nii", "entity 'run' appears twice"),
        ("acq-a_T1w.nii.gz", "no sub-<label> entity"),
        ("sub-01_run-a_T1w.nii.gz", "'run-a': run is an index, a number"),
    ],
)
def test_names_that_are_not_bids_say_why(name, problem):
    with pytest.raises(ValueError, match=problem):
        bids.parse_name(name)


def image(name: str) -> bids.BidsImage:
    entities, _, ext = bids.parse_name(name)
    return bids.BidsImage(Path(name), entities, ext)


def verdicts(names, **select):
    sel = bids.Selection.from_config(select, "datasets/d/select")
    return {
        v.image.path.name: (v.status, v.reason)
        for v in bids.select_images([image(n) for n in names], sel, "datasets/d/select")
    }


def test_runs_differing_only_in_run_are_chosen_among_per_acquisition():
    names = ["sub-1_acq-a_run-1_T1w.nii.gz", "sub-1_acq-a_run-2_T1w.nii.gz"]
    names += ["sub-1_acq-b_run-1_T1w.nii.gz"]
    out = verdicts(names, filters={"acq": "a"}, runs="last")
    assert out["sub-1_acq-a_run-2_T1w.nii.gz"] == ("ok", "")
    assert out["sub-1_acq-a_run-1_T1w.nii.gz"] == ("skipped", "run-1 not selected (runs: last)")
    out = verdicts(names)  # acq-a run-1 and acq-b run-1 are both left: no silent choice
    assert out["sub-1_acq-b_run-1_T1w.nii.gz"][0] == "problem"
    assert (
        "choose with config key 'datasets/d/select/filters/acq'"
        in out["sub-1_acq-b_run-1_T1w.nii.gz"][1]
    )


def test_run_filters_compare_numbers():
    out = verdicts(["sub-1_run-01_T1w.nii", "sub-1_run-2_T1w.nii"], filters={"run": 1})
    assert out["sub-1_run-01_T1w.nii"] == ("ok", "")
    assert out["sub-1_run-2_T1w.nii"] == ("skipped", "run-2 not selected (filters: run: 1)")


def test_natural_order():
    assert sorted(["10", "2", "b", "a1"], key=bids.natural_key) == ["2", "10", "a1", "b"]


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"^config key 'k/filters/ses': not an entity"):
        bids.Selection.from_config({"filters": {"ses": "1"}}, "k")
    with pytest.raises(ConfigError, match=r"^config key 'k/filters/acq': \[\] is not a value"):
        bids.Selection.from_config({"filters": {"acq": []}}, "k")


def test_the_schema_documents_exactly_the_select_keys():
    dataset = load_schema()["properties"]["datasets"]["additionalProperties"]
    select = dataset["properties"]["select"]
    assert set(select["properties"]) == set(bids.DEFAULTS)
    assert all("default" not in spec for spec in select["properties"].values())  # code's DEFAULTS
    assert select["properties"]["runs"]["enum"] == list(bids.RUNS)
    assert select["properties"]["prefer_extension"]["enum"] == list(bids.EXTENSIONS)


# --- .bidsignore: gitignore patterns relative to the dataset root, as the validator reads them

IGNORE_PATTERNS = [
    "# scanner tests",
    "",
    "*_acq-lowres_*",
    "**/meg/",
    "/sub-02/",
    "sub-0?/anat/*.nii",
    "**/func/**",
    "anat/sub-05_T1w.nii.gz",  # a slash inside: relative to the root, so no sub-05 file
    "sub-06",
    "sub-07/**/x_T1w.nii.gz",
    "ses-[ab]/",
    "sub-08/*",
    "!sub-08/anat/",
    "extra_T1w.nii.gz   ",
]
IGNORE_PATHS = [
    "sub-01/anat/sub-01_T1w.nii.gz",
    "sub-01/anat/sub-01_acq-lowres_T1w.nii.gz",
    "sub-01/ses-1/meg/sub-01_ses-1_meg.fif",
    "sub-01/meg.txt",
    "sub-02/anat/sub-02_T1w.nii.gz",
    "x/sub-02/anat/sub-02_T1w.nii.gz",
    "sub-03/anat/sub-03_T1w.nii",
    "sub-03/anat/deep/sub-03_T1w.nii",
    "sub-04/func/a/b.nii.gz",
    "sub-04/funcx/b.nii.gz",
    "sub-05/anat/sub-05_T1w.nii.gz",
    "anat/sub-05_T1w.nii.gz",
    "sub-06/anat/sub-06_T1w.nii.gz",
    "sub-07/x_T1w.nii.gz",
    "sub-07/ses-1/anat/x_T1w.nii.gz",
    "sub-09/ses-a/anat/sub-09_ses-a_T1w.nii.gz",
    "sub-09/ses-c/anat/sub-09_ses-c_T1w.nii.gz",
    "sub-08/anat/sub-08_T1w.nii.gz",
    "sub-08/dwi/sub-08_dwi.nii.gz",
    "sub-10/anat/extra_T1w.nii.gz",
]


def test_bidsignore_patterns_match_as_git_reads_them():
    ignore = bids.BidsIgnore.parse(IGNORE_PATTERNS, Path("/data"))
    ignored = sorted(p for p in IGNORE_PATHS if ignore.ignores(Path("/data") / p))
    assert ignored == sorted(
        [
            "sub-01/anat/sub-01_acq-lowres_T1w.nii.gz",
            "sub-01/ses-1/meg/sub-01_ses-1_meg.fif",
            "sub-02/anat/sub-02_T1w.nii.gz",
            "sub-03/anat/sub-03_T1w.nii",
            "sub-04/func/a/b.nii.gz",
            "anat/sub-05_T1w.nii.gz",
            "sub-06/anat/sub-06_T1w.nii.gz",
            "sub-07/x_T1w.nii.gz",
            "sub-07/ses-1/anat/x_T1w.nii.gz",
            "sub-09/ses-a/anat/sub-09_ses-a_T1w.nii.gz",
            "sub-08/dwi/sub-08_dwi.nii.gz",
            "sub-10/anat/extra_T1w.nii.gz",
        ]
    )
    assert not bids.BidsIgnore.parse(["# only a comment", ""], Path("/d")).patterns


def test_bidsignore_agrees_with_pathspec_where_pathspec_is_installed():
    """pathspec (a dev tool's dependency, not medtx's) implements git's rules in full."""
    pathspec = pytest.importorskip("pathspec")
    spec = pathspec.GitIgnoreSpec.from_lines(IGNORE_PATTERNS)
    ignore = bids.BidsIgnore.parse(IGNORE_PATTERNS, Path("/data"))
    for path in IGNORE_PATHS:
        assert ignore.ignores(Path("/data") / path) == spec.match_file(path), path
