"""`python -m fastattn bench`: the whole benchmark, a step at a time with its progress on stderr,
the record saved after every step (a run killed at a time limit keeps what it measured)."""
from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from .attention import run_case
from .calls import call_rows
from .context_parallel import context_parallel_rows
from .cases import grid
from .decode import decode_rows
from .models import encoder_rows, model_rows, module_rows
from .packed import varlen_rows
from .score_mods import score_mod_rows
from .record_report import environment, plot, print_tables
from .timing import add_peak_shares, peaks


def steps(record: dict, device: str, quick: bool, min_run_time: float, end_to_end: bool) -> list:
    """(label, fn) in the order they run: small calls, decoding and packed rows first, then the attention grid,
    the score modifiers, the per-ISA table (CPU, full run), the modules and the whole models. Each fn adds its
    rows."""
    def add(key, rows_of):
        return lambda: record.setdefault(key, []).extend(rows_of())

    todo = [("small calls", add("calls", lambda: call_rows(device, quick))),
            ("decoding", add("decode", lambda: decode_rows(device, quick, min_run_time))),
            ("packed sequences", add("varlen", lambda: varlen_rows(device, quick, min_run_time)))]
    todo += [(case.label, add("rows", lambda case=case: run_case(case, device, quick, min_run_time)))
             for case in grid(device, quick)]
    todo.append(("windows, softcap and sinks", add("score_mods", lambda: score_mod_rows(device, quick, min_run_time))))
    if device == "cpu":
        todo.append(("context parallelism (ring attention, 2 processes)",
                     add("context_parallel", lambda: context_parallel_rows(device, quick, min_run_time))))
    if device == "cpu" and not quick:
        from .isa import isa_rows

        todo.append(("the CPU kernel per ISA table", add("isa", lambda: isa_rows(min_run_time=min_run_time))))
    todo.append(("MultiHeadAttention against nn.MultiheadAttention",
                 add("modules", lambda: module_rows(device, quick, min_run_time))))
    if end_to_end:
        if not quick:
            todo.append(("nn.TransformerEncoder after replace_attention", add("end_to_end", lambda: encoder_rows(device))))
        todo.append(("the notes' Transformer, a training step", add("end_to_end", lambda: model_rows(device, quick))))
    return todo


def run(quick: bool = False, json_path: str | None = None, plot_path: str | None = None,
        device: str | None = None, tests: str | None = None, end_to_end: bool = True) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_flush_denormal(True)  # every provider alike: denormals slow CPU training 10x+
    warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors")  # torch's own
    began = time.perf_counter()
    record = environment(device)
    if tests:
        passed, failed, skipped = (int(x) for x in tests.split(","))
        record["gpu_tests"] = dict(passed=passed, failed=failed, skipped=skipped)
    dtypes = sorted({case.dtype for case in grid(device, quick)} | {"fp32" if device == "cpu" else "bf16"})  # + packed
    record["peaks"] = peaks(device, dtypes)
    record.update(rows=[], calls=[], decode=[], varlen=[], score_mods=[], context_parallel=[], modules=[], end_to_end=[],
                  complete=False)

    def save():
        if json_path:
            tmp = Path(f"{json_path}.tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(record, indent=1, default=str))
            os.replace(tmp, json_path)  # a kill mid-write leaves the previous whole record

    todo = steps(record, device, quick, 0.1 if quick else 1.0, end_to_end)
    for i, (label, step) in enumerate(todo, 1):
        print(f"[{i:2}/{len(todo)} {time.perf_counter() - began:5.0f} s] {label}", file=sys.stderr, flush=True)
        step()
        add_peak_shares(record["rows"] + record["varlen"] + record["score_mods"] + record["context_parallel"],
                        record["peaks"])
        save()
    if device == "cpu":  # the peak again: a slow phase at the start must not lower it
        record["peaks"] = peaks(device, dtypes, before=record["peaks"])
        add_peak_shares(record["rows"] + record["varlen"] + record["score_mods"] + record["context_parallel"],
                        record["peaks"])
    record["complete"] = True
    record["seconds"] = time.perf_counter() - began
    save()
    print_tables(record)
    if plot_path:
        plot(record, plot_path)
    return record
