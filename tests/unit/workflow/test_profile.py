"""The SLURM profile groups every per-scan step rule (there, not in the rules)."""

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[3]


def per_scan_rules() -> set[str]:
    """Rules whose log is per scan (a `{scan}` wildcard), read from the rule files."""
    rules = set()
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        # rules at the top level or under an `if` (preprocess/job_per)
        for block in re.split(r"\n(?= *rule )", smk.read_text()):
            m = re.match(r" *rule (\w+):", block)
            log = re.search(r"\n +log:\n\s+(.+)\n", block)
            if m and log and "{{scan}}" in log.group(1):
                rules.add(m.group(1))
    return rules


def test_profile_groups_every_per_scan_rule():
    profile = yaml.safe_load((REPO / "slurm" / "config.yaml").read_text())
    rules = per_scan_rules()
    assert {"preprocess_t1", "bet", "collect_provenance", "brats_preprocess"} <= rules
    # preprocess_t1 is one job per scan already: a group of one adds nothing
    assert set(profile["groups"]) == rules - {"preprocess_t1"}
    assert set(profile["groups"].values()) == set(profile["group-components"]) == {"subject"}
