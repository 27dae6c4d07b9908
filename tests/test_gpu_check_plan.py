"""benchmarks/gpu_check.sh's plan, checked without a GPU: the script runs in a scratch copy of the
repository with a stand-in python (each tool writes what it is told to write, where it is told to)
and stand-in nvidia-smi and compute-sanitizer. Every correctness step comes before the timing
steps (bench, dispatch, Gluon, cuda goal), their caps fit the deadline on either build branch (the
CUDA build, or its CPU-only retry), the output holds at most the 8 files a device run returns
(Gluon's defaults and the checked-config manifest among them, the rest bundled), the commit comes
first, and the GPU test list selects what it names. Also the selection of benchmarks/pytest_live.py."""
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))
import pytest_live  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")

# The stand-in python: the bundler's stdlib script runs on the real one; everything else writes
# its outputs where its arguments say and exits 0 (the CUDA build fails under FAKE_BUILD_FAIL).
FAKE_PYTHON = r"""#!/usr/bin/env bash
arg() { local want=$1; shift; while (($#)); do [[ $1 == "$want" ]] && { echo "$2"; return; }; shift; done; }
echo "python $* [FASTATTN_NO_CUDA=${FASTATTN_NO_CUDA:-}]" >>"$FAKE_CALLS"
case $1 in
  -) exec REAL_PYTHON "$@" ;;
  setup.py) [[ -n ${FAKE_BUILD_FAIL:-} && ${FASTATTN_NO_CUDA:-} != 1 ]] && exit 1; exit 0 ;;
  -c) if [[ $2 == *available_backends* ]]; then echo "$FAKE_ARCH $FAKE_BACKENDS" >"${*: -1}"; exit 0; fi
      [[ $2 == *"import xdist"* || $2 == *"import pytest_timeout"* ]] && exit 1
      exit 0 ;;
  -m) case $2 in
        pytest) echo "3,0,1" >"$FASTATTN_LIVE_COUNTS"; echo '{"t": 1.0}' >"$FASTATTN_LIVE_DURATIONS"
                printf '%s\n' "$FASTATTN_SELECT" >"$FAKE_SELECT" ;;
        fastattn.bench.triton_checked) echo '{"configs": []}' >"$3" ;;
        fastattn) case $3 in
            bench) echo '{"rows": []}' >"$(arg --json "$@")"; echo png >"$(arg --plot "$@")" ;;
            tune) out=$(arg --out "$@"); echo '{}' >"${out:-$(arg --json "$@")}" ;;
          esac ;;
      esac ;;
  benchmarks/gluon_check.py)
      if [[ " $* " == *" --check-only "* ]]; then
        echo '{"variant": [8, 2, 128, true], "status": "ok"}' >>"$2/gluon_checks.jsonl"
      else echo '{"rows": []}' >"$2/gluon_record.json"; echo '{"d128": [8, 2, 128, true]}' >"$(arg --tuned "$@")"; fi ;;
  benchmarks/cuda_goal.py) echo '{"rows": []}' >"$2/cuda_goal.json" ;;
esac
exit 0
"""
CORRECTNESS = ["build", "build (CPU only)", "versions: nvidia-smi", "versions: fastattn", "tests", "checked configs",
               "sanitizer: memcheck", "sanitizer: racecheck"]
TIMING = ["tune", "bench", "plot", "dispatch", "gluon: check", "gluon: timing", "cuda goal"]


def total_s() -> int:
    return int(re.search(r"^TOTAL_S=\$\{TOTAL_S:-(\d+)\}", SCRIPT.read_text(), re.M).group(1))


def gpu_tests() -> str:
    text = SCRIPT.read_text()
    return text.split("GPU_TESTS=$(cat <<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]


def run_plan(tmp_path: Path, *, build_fails=False,
             backends="triton cuda gluon cpu reference") -> dict:
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    shutil.copy(SCRIPT, repo / "benchmarks" / "gpu_check.sh")
    (repo / "benchmarks" / ".commit").write_text("0123abc\n")
    (repo / "fastattn" / "triton" / "tuned").mkdir(parents=True)
    (repo / "tests").mkdir()
    for name in set(re.findall(r"^(tests/[^:]+)::", gpu_tests(), re.M)):
        (repo / name).write_text("")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tools = {"python": FAKE_PYTHON.replace("REAL_PYTHON", sys.executable),
             "nvidia-smi": "#!/bin/sh\necho fake GPU\n", "compute-sanitizer": "#!/bin/sh\nexit 0\n"}
    for name, text in tools.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTATTN_", "TRITON_")) and k not in (
        "OUT", "TOTAL_S", "TUNE", "PYTHONPATH")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", PYTHON=str(bin_dir / "python"), TMPDIR=str(tmp_path),
               FAKE_CALLS=str(tmp_path / "calls"), FAKE_SELECT=str(tmp_path / "select"), FAKE_ARCH="sm90",
               FAKE_BACKENDS=backends)
    if build_fails:
        env["FAKE_BUILD_FAIL"] = "1"
    done = subprocess.run(["bash", str(repo / "benchmarks" / "gpu_check.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=120)
    log = (out / "gpu_check.log").read_text()
    assert done.returncode == 0, log[-3000:] + done.stderr
    starts = re.findall(r"^== \[[^]]*\] start (.+) \(limit (\d+)s\)$", log, re.M)
    return dict(log=log, out=out, repo=repo, steps=[name for name, _ in starts],
                caps={name: int(cap) for name, cap in starts}, select=(tmp_path / "select").read_text(),
                tmp=tmp_path)


def check_budget(plan: dict) -> None:
    assert total_s() <= 420, "the whole check must end inside 7 minutes"
    steps = plan["steps"]
    assert set(steps) <= set(CORRECTNESS + TIMING), steps
    last_correctness = max(i for i, s in enumerate(steps) if s in CORRECTNESS)
    assert all(s in CORRECTNESS for s in steps[:last_correctness + 1]), f"a timing step before correctness: {steps}"
    correctness_caps = sum(cap for name, cap in plan["caps"].items() if name in CORRECTNESS)
    assert correctness_caps <= total_s(), (correctness_caps, plan["caps"])
    files = sorted(p.name for p in plan["out"].iterdir())
    assert len(files) <= 8, files
    assert all(p.is_file() for p in plan["out"].iterdir()), "a device run returns no folder's files"
    assert not list(plan["tmp"].glob("gpu_check.*")), "the staging folder outlives the run"


def test_the_plan_on_a_gpu_with_every_backend(tmp_path):
    plan = run_plan(tmp_path)
    assert plan["log"].splitlines()[0] == "commit: 0123abc"
    assert plan["steps"] == ["build", "versions: nvidia-smi", "versions: fastattn", "tests", "checked configs",
                             "sanitizer: memcheck", "sanitizer: racecheck", "bench", "dispatch", "gluon: check",
                             "gluon: timing", "cuda goal"]
    check_budget(plan)
    assert sorted(p.name for p in plan["out"].iterdir()) == [
        "checked.json", "dispatch-table.json", "gluon_tuned.json", "gpu_check.log", "gpu_extras.json",
        "gpu_plots.png", "gpu_record.json"]  # + test_failures.log when a test fails: 8
    extras = json.loads((plan["out"] / "gpu_extras.json").read_text())
    assert extras["commit"] == "0123abc" and extras["test_counts.txt"].strip() == "3,0,1"
    assert set(extras) >= {"test_durations.json", "gluon_checks.jsonl", "gluon_record.json", "cuda_goal.json"}
    assert (plan["repo"] / "fastattn" / "triton" / "tuned" / "checked-sm90.json").exists()
    assert not (plan["repo"] / "fastattn" / "gluon").exists(), "Gluon's defaults go to the output, not the tree"
    assert "test_every_candidate_config_is_right" not in plan["select"]  # the checked-configs step covers it
    assert "output files: 7" in plan["log"]


def test_a_failed_cuda_build_retries_without_cuda_and_keeps_the_triton_steps(tmp_path):
    plan = run_plan(tmp_path, build_fails=True, backends="triton cpu reference")
    assert plan["steps"] == ["build", "build (CPU only)", "versions: nvidia-smi", "versions: fastattn", "tests",
                             "checked configs", "bench", "dispatch"]
    check_budget(plan)
    builds = [line for line in (tmp_path / "calls").read_text().splitlines() if line.startswith("python setup.py")]
    assert [line.endswith("[FASTATTN_NO_CUDA=1]") for line in builds] == [False, True], builds
    assert re.search(r"^sanitizers .* skipped: no cuda backend", plan["log"], re.M)
    assert len(list(plan["out"].iterdir())) <= 8


def test_the_correctness_caps_fit_the_deadline_on_both_build_branches():
    text = SCRIPT.read_text()
    cap = {name: int(re.search(rf"\b{name}=\$\{{{name}:-(\d+)\}}", text).group(1))
           for name in ("BUILD_TIMEOUT", "BUILD_CPU_TIMEOUT", "TEST_TIMEOUT", "CHECKED_TIMEOUT", "SANITIZE_TIMEOUT")}
    versions = 10 + 20
    common = cap["BUILD_TIMEOUT"] + versions + cap["TEST_TIMEOUT"] + cap["CHECKED_TIMEOUT"]
    cuda_build = common + 2 * cap["SANITIZE_TIMEOUT"]
    cpu_retry = common + cap["BUILD_CPU_TIMEOUT"]  # the sanitizers skip: no cuda backend
    assert max(cuda_build, cpu_retry) <= total_s() <= 420, (cuda_build, cpu_retry, total_s())


def test_selection_keeps_the_list_order_takes_brackets_as_they_are_and_drops_bang_lines():
    ids = ["tests/a.py::t[(4, 4)-1-torch.bfloat16]", "tests/a.py::t[(8, 2)-1-torch.float32]",
           "tests/a.py::u", "tests/b.py::v[x]", "tests/b.py::v[y]"]
    text = """
    # a comment
    tests/b.py::v[*]      # the b tests first
    tests/a.py::t[(8, 2)-*]
    tests/a.py::*
    !tests/b.py::v[y]
    tests/c.py::nothing   # matches nothing: no error
    """
    assert [ids[i] for i in pytest_live.select(ids, text)] == [
        "tests/b.py::v[x]", "tests/a.py::t[(8, 2)-1-torch.float32]", "tests/a.py::t[(4, 4)-1-torch.bfloat16]",
        "tests/a.py::u"]
    assert pytest_live.select(ids, "tests/a.py::t[(4, 4)-1-torch") == []  # a whole-id match, not a prefix


class _Collected:
    def __init__(self):
        self.ids, self.broken = [], set()

    def pytest_collection_modifyitems(self, items):
        self.ids += [item.nodeid for item in items]

    def pytest_collectreport(self, report):
        if report.failed:  # a file that does not import: another test reports it
            self.broken.add(report.nodeid)


def test_each_gpu_test_pattern_selects_a_test():
    """On this machine's collection (the ids a GPU collects, but for the backends listed), so that a
    renamed test or parameter does not silently leave the GPU check. In this process: the test
    modules are mostly imported already, where a fresh one would import torch again."""
    pytest.importorskip("triton")  # the triton-backend rows are collected only where it runs
    patterns = [line for line in gpu_tests().splitlines() if line.strip() and not line.startswith("#")]
    files = sorted({p.split("::")[0] for p in patterns})
    collected = _Collected()
    pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors",
                 "--rootdir", str(ROOT), *(str(ROOT / f) for f in files)], plugins=[collected])
    unmatched = [p for p in patterns if p.split("::")[0] not in collected.broken
                 and not pytest_live.select(collected.ids, p)]
    assert not unmatched, unmatched
