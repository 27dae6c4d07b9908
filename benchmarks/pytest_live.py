"""A pytest plugin for runs that may be killed at a time limit (benchmarks/gpu_check.sh): each
failure's full report is appended to $FASTATTN_LIVE_LOG the moment it happens, the running
"passed,failed,skipped" counts (one outcome per test, the worst of its phases) are rewritten to
$FASTATTN_LIVE_COUNTS after every report, and each test's seconds (its phases summed) to the JSON
$FASTATTN_LIVE_DURATIONS ({node id: seconds}: what the next sizing of the GPU test list reads).
Load with `-p pytest_live` (benchmarks/ on PYTHONPATH). Under pytest-xdist only the controller
writes: it sees every worker's reports.

$FASTATTN_SELECT (optional): the tests to run, one node-id pattern a line (`*` matches any run
of characters, everything else itself, brackets included; `#` at the start or after a space
begins a comment; a line starting with `!` drops what it matches). A test runs when some pattern
matches its whole node id and no `!` line does, in the order of the first pattern it matches (the
list's order is its priority: a run cut at its time limit loses the end of the list). Unlike -k
it takes parametrize ids as they are, and unlike node ids on the command line a pattern that
matches nothing is no error. Each process that collects applies it (pytest-xdist's workers do)."""
from __future__ import annotations

import json
import os
import re

import pytest

RANK = {"passed": 0, "skipped": 1, "failed": 2}


def parse_patterns(text: str) -> tuple[list[re.Pattern], list[re.Pattern]]:
    """(keep, drop) regular expressions from $FASTATTN_SELECT's lines."""
    keep, drop = [], []
    for line in text.splitlines():
        line = re.split(r"\s+#", line, maxsplit=1)[0].strip()
        if not line or line.startswith("#"):
            continue
        target = drop if line.startswith("!") else keep
        line = line.lstrip("!").strip()
        target.append(re.compile(".*".join(re.escape(part) for part in line.split("*"))))
    return keep, drop


def select(nodeids: list[str], text: str) -> list[int]:
    """Indices of the node ids to run, in run order (see the module's docstring)."""
    keep, drop = parse_patterns(text)
    ranked = []
    for i, nodeid in enumerate(nodeids):
        if any(p.fullmatch(nodeid) for p in drop):
            continue
        rank = next((r for r, p in enumerate(keep) if p.fullmatch(nodeid)), None)
        if rank is not None:
            ranked.append((rank, i))
    return [i for _, i in sorted(ranked)]


class Select:
    def __init__(self, text: str):
        self.text = text

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items):
        chosen = select([item.nodeid for item in items], self.text)
        kept = set(chosen)
        deselected = [item for i, item in enumerate(items) if i not in kept]
        items[:] = [items[i] for i in chosen]
        if deselected:
            config.hook.pytest_deselected(items=deselected)


class Live:
    def __init__(self, log: str | None, counts: str | None, durations: str | None = None):
        self.log, self.counts, self.durations_path, self.outcomes, self.seconds = log, counts, durations, {}, {}

    def record(self, nodeid: str, outcome: str) -> None:
        if RANK[outcome] >= RANK[self.outcomes.get(nodeid, "passed")]:
            self.outcomes[nodeid] = outcome
        self.write_counts()

    @staticmethod
    def _replace(path: str, text: str) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)  # atomic: a kill never leaves half a file

    def write_counts(self) -> None:
        if not self.counts:
            return
        values = list(self.outcomes.values())
        self._replace(self.counts, ",".join(str(values.count(o)) for o in ("passed", "failed", "skipped")) + "\n")

    def write_durations(self) -> None:
        if self.durations_path:
            self._replace(self.durations_path, json.dumps({k: round(v, 2) for k, v in self.seconds.items()}, indent=0))

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
        self.seconds[report.nodeid] = self.seconds.get(report.nodeid, 0.0) + report.duration
        if report.when == "teardown":
            self.write_durations()
        if report.failed:
            self.write_failure(report.nodeid, report.when, report.longreprtext)
            self.record(report.nodeid, "failed")
        elif report.skipped:  # includes xfail
            self.record(report.nodeid, "skipped")
        elif report.when == "call":
            self.record(report.nodeid, "passed")


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    if os.environ.get("FASTATTN_SELECT", "").strip():
        config.pluginmanager.register(Select(os.environ["FASTATTN_SELECT"]), "fastattn-select")
    if not hasattr(config, "workerinput"):
        config.pluginmanager.register(Live(os.environ.get("FASTATTN_LIVE_LOG"), os.environ.get("FASTATTN_LIVE_COUNTS"),
                                           os.environ.get("FASTATTN_LIVE_DURATIONS")), "fastattn-live")
