"""The learning tier: each backbone learns each task (``medtx.train.learnability``).

``--broken labels`` runs the same checks on shuffled training and validation labels: every one
must then fail. Each check's metric, bar and ceiling are printed at the end of the
run (through the report's user properties, so also under pytest-xdist).
"""

import pytest

SECTION = "learnability"


def pytest_addoption(parser):
    parser.addoption(
        "--broken",
        choices=["labels"],
        default=None,
        help="learning tier: train and select on shuffled labels (every check must then fail)",
    )


@pytest.fixture(scope="session")
def broken(request):
    return request.config.getoption("--broken")


@pytest.fixture
def report_line(record_property):
    """Record a line for the run's learnability summary."""
    return lambda line: record_property(SECTION, line)


def pytest_terminal_summary(terminalreporter):
    lines = [
        value
        for reports in terminalreporter.stats.values()
        for report in reports
        if getattr(report, "when", None) == "call"
        for key, value in getattr(report, "user_properties", [])
        if key == SECTION
    ]
    if lines:
        terminalreporter.write_sep("-", "learnability: test metric beside the cohort's ceiling")
        for line in sorted(lines, key=lambda line: line.split(":")[0]):
            terminalreporter.write_line(line)
