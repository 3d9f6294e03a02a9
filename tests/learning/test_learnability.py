"""Every backbone learns every task on a planted cohort, within a stated distance of
what the cohort allows (``medtx.train.learnability.goals``).

One cohort per task (``medtx.train.planted``) serves both backbones; each case runs
the real fine-tuning stage, about a minute on one core. ``pytest -m learning
--broken labels`` trains and selects on shuffled labels, and every case must fail.
"""

import pytest

from medtx.domain import BACKBONES, TASKS
from medtx.train.learnability import SIZES, check
from medtx.train.planted import COHORTS

pytestmark = pytest.mark.learning


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    made = {}

    def get(task):
        if task not in made:
            made[task] = COHORTS[task](tmp_path_factory.mktemp(task), n=SIZES[task])
        return made[task]

    return get


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_backbone_learns_task(backbone, task, cohorts, broken, tmp_path, report_line):
    result = check(backbone, task, tmp_path, cohort=cohorts(task), broken=broken)
    for line in result.lines():
        report_line(line)
    assert result.passed, "\n".join(result.lines())
