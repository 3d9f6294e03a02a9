"""The learning tier: each backbone learns each task (``medtx.train.learnability``).

``--broken labels`` (declared in ``tests/conftest.py``) runs the same checks on
shuffled training and validation labels: every one must then fail. Each check's
metric, bar and ceiling are printed at the end of the run by the root conftest,
which the pytest-xdist controller loads, through the reports' user properties.
"""

import pytest

from tests.conftest import LEARNING_SECTION as SECTION


@pytest.fixture(scope="session")
def broken(request):
    return request.config.getoption("--broken")


@pytest.fixture
def report_line(record_property):
    """Record a line for the run's learnability summary."""
    return lambda line: record_property(SECTION, line)
