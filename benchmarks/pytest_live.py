"""A pytest plugin for runs that may be killed at a time limit (benchmarks/gpu_check.sh): each
failure's full report is appended to $FASTATTN_LIVE_LOG the moment it happens, and the running
"passed,failed,skipped" counts (one outcome per test, the worst of its phases) are rewritten to
$FASTATTN_LIVE_COUNTS after every report. Load with `-p pytest_live` (benchmarks/ on PYTHONPATH).
Under pytest-xdist only the controller writes: it sees every worker's reports."""
from __future__ import annotations

import os

import pytest

RANK = {"passed": 0, "skipped": 1, "failed": 2}


class Live:
    def __init__(self, log: str | None, counts: str | None):
        self.log, self.counts, self.outcomes = log, counts, {}

    def record(self, nodeid: str, outcome: str) -> None:
        if RANK[outcome] >= RANK[self.outcomes.get(nodeid, "passed")]:
            self.outcomes[nodeid] = outcome
        self.write_counts()

    def write_counts(self) -> None:
        if not self.counts:
            return
        values = list(self.outcomes.values())
        tmp = f"{self.counts}.tmp"
        with open(tmp, "w") as f:
            f.write(",".join(str(values.count(o)) for o in ("passed", "failed", "skipped")) + "\n")
        os.replace(tmp, self.counts)  # atomic: a kill never leaves half a line

    def write_failure(self, nodeid: str, when: str, text: str) -> None:
        if self.log:
            with open(self.log, "a") as f:
                f.write(f"=== FAILED {nodeid} ({when})\n{text}\n\n")
                f.flush()

    def pytest_sessionstart(self, session):
        self.write_counts()  # 0,0,0: the run started

    def pytest_collectreport(self, report):
        if report.failed:  # a file that does not import is a failure, not a silent gap
            self.write_failure(report.nodeid, "collect", report.longreprtext)
            self.record(report.nodeid, "failed")

    def pytest_runtest_logreport(self, report):
        if report.failed:
            self.write_failure(report.nodeid, report.when, report.longreprtext)
            self.record(report.nodeid, "failed")
        elif report.skipped:  # includes xfail
            self.record(report.nodeid, "skipped")
        elif report.when == "call":
            self.record(report.nodeid, "passed")


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    if not hasattr(config, "workerinput"):
        config.pluginmanager.register(Live(os.environ.get("FASTATTN_LIVE_LOG"),
                                           os.environ.get("FASTATTN_LIVE_COUNTS")), "fastattn-live")
