"""`python -m fastattn tune --dispatch`: this machine's dispatch table (fastattn.backends.dispatch),
from timings of every fastattn backend that takes a benchmark case (the cases more than one
takes), or from a benchmark record's rows (--from-record).

    python -m fastattn tune --dispatch [--device cpu|cuda] [--quick] [--out PATH]
    python -m fastattn tune --dispatch --from-record benchmarks/results/.../gpu_record.json --out PATH

Without --out the table goes to this machine's cache, where dispatch reads it over the shipped one.
"""
from __future__ import annotations

import argparse
import datetime
import json
from dataclasses import fields
from pathlib import Path

import torch

from ..backends import REGISTRY, dispatch
from ..backends.sdpa import SdpaBackend, torch_kernel
from .attention import case_problem, fastattn_backends, run_case
from .cases import DTYPES, Case, grid


def _case(row: dict) -> Case:
    return Case(**{f.name: row[f.name] for f in fields(Case)})


def _torch_kernel_ms(rows: list[dict], case: Case, device: str) -> float | None:
    """The time of the torch kernel the sdpa backend runs for the case, from a record made before
    that backend existed (its sdpa:<kernel> row)."""
    timed = {r["backend"]: r["ms"] for r in rows if r.get("ms")}
    kernel = torch_kernel(device, DTYPES[case.dtype], case.head_dim, case.kv_heads != case.heads,
                          cudnn="sdpa:cudnn" in timed)
    return timed.get(f"sdpa:{kernel}")


MARGIN = {"cuda": 0.03, "cpu": 0.10}  # CUDA events repeat within ~1%; a shared CPU drifts by ~10%


def table_entries(rows: list[dict], device: str) -> dict[str, dict]:
    """Case key -> {"order": backends fastest first (ranked), "ms": backend -> ms} from benchmark
    rows, for the cases that more than one backend took."""
    by_case: dict[str, list[dict]] = {}
    for row in rows:
        by_case.setdefault(row["case"], []).append(row)
    entries = {}
    for case_rows in by_case.values():
        case = _case(case_rows[0])
        problem = case_problem(case, device)
        ms = {r["backend"].split(":", 1)[1]: r["ms"] for r in case_rows
              if r["backend"].startswith("fastattn:") and r["backend"] != "fastattn:auto" and r.get("ms")}
        if "sdpa" not in ms and not SdpaBackend().reasons(problem):
            if (t := _torch_kernel_ms(case_rows, case, device)) is not None:
                ms["sdpa"] = t
        if len(ms) > 1:
            entries[dispatch.case_key(problem)] = {"order": ranked(ms, MARGIN[device]), "ms": ms}
    return entries


def ranked(ms: dict[str, float], margin: float) -> list[str]:
    """Backends fastest first, except that the registry's favourite among those within `margin`
    of the fastest leads: a timing's noise should not overturn the default order."""
    order = sorted(ms, key=ms.get)
    names = list(REGISTRY)
    close = [b for b in order if ms[b] <= ms[order[0]] * (1 + margin)]
    first = min(close, key=lambda b: names.index(b) if b in names else len(names))
    return [first] + [b for b in order if b != first]


def sweep(device: str, quick: bool, min_run_time: float) -> list[dict]:
    """Rows of the fastattn backends on each case of the benchmark's grid that two or more take."""
    rows = []
    for case in grid(device, quick):
        names = fastattn_backends(case, device)
        if len(names) > 1:
            print(f"  {case.label}: {', '.join(names)}", flush=True)
            rows += run_case(case, device, quick, min_run_time, fastattn_only=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastattn tune --dispatch")
    parser.add_argument("--dispatch", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="the benchmark's quick grid")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds per CPU timing")
    parser.add_argument("--from-record", help="a benchmark record (JSON) to read the rows from instead")
    parser.add_argument("--out", help="where to write the table (default: this machine's cache)")
    args = parser.parse_args(argv)
    if args.from_record:
        record = json.loads(Path(args.from_record).read_text())
        device = "cpu" if record["device"].lower().startswith("cpu") else "cuda"
        name, rows, source = record["device"].lower().replace(" ", "-"), record["rows"], args.from_record
    else:
        device, source = args.device, "python -m fastattn tune --dispatch"
        name, rows = dispatch.machine(device), sweep(device, args.quick, args.min_run_time)
    entries = table_entries(rows, device)
    out = Path(args.out) if args.out else dispatch.cache_dir() / f"dispatch-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": name, "source": source, "torch": torch.__version__,
                               "date": datetime.date.today().isoformat(), "entries": entries},
                              indent=1, sort_keys=True) + "\n")
    print(f"{len(entries)} cases ranked for {name} -> {out}")
    return 0
