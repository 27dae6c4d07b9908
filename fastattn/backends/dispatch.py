"""Which backend `auto` takes, from measurements.

A table per machine kind (a GPU by name, "nvidia-h200"; a CPU by the ISA its kernels run,
"cpu-amx_bf16") ranks the backends, fastest first, for cases keyed by dtype, head dim, masks
and grouped-query attention, causality, forward or forward+backward, and the length bucket of
the keys: "bf16|d128|gqa|causal|fwd|n4096". `python -m fastattn tune --dispatch` times the capable
backends and writes this machine's table to the cache ($FASTATTN_CACHE_DIR or
~/.cache/fastattn); tables measured on the team's machines ship in fastattn/backends/tables/.
A call takes its own case's ranking, else that of the nearest length bucket at most two
octaves away; with neither, the registry's order holds.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .base import Problem

SHIPPED = Path(__file__).parent / "tables"
NEAREST_OCTAVES = 2
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def cache_dir() -> Path:
    return Path(os.environ.get("FASTATTN_CACHE_DIR", Path.home() / ".cache" / "fastattn"))


def machine(device: str) -> str:
    """The table's name for this machine's `device`."""
    if device == "cuda":
        return torch.cuda.get_device_name().lower().replace(" ", "-")
    from .. import _C

    return f"cpu-{_C.cpu_isa()}"


def kind_name(problem: Problem) -> str:
    """The call's kind: its masks, and what else changes which kernel wins."""
    parts = [name for name, on in (("padded", problem.key_padding), (f"{problem.mask_kind}-mask", problem.mask_kind),
                                   ("varlen", problem.varlen), ("decode", problem.decode),
                                   ("dropout", problem.dropout), ("gqa", problem.gqa)) if on]
    return "+".join(parts) or "dense"


def case_key(problem: Problem) -> str:
    dtype = DTYPE_NAMES.get(problem.dtype, str(problem.dtype))
    return (f"{dtype}|d{problem.head_dim}|{kind_name(problem)}|{'causal' if problem.causal else 'full'}|"
            f"{'fwd+bwd' if problem.needs_grad else 'fwd'}|n{problem.nk}")


def _split(key: str) -> tuple[str, int | None]:
    """(the key without its length bucket, the bucket; None for a key of another form)."""
    head, _, n = key.rpartition("|n")
    return head, int(n) if n.isdigit() else None


class Table:
    """One machine's rankings: case key -> backend names, fastest first."""

    def __init__(self, entries: dict[str, list[str]]):
        self.entries = entries
        self._by_head: dict[str, list[tuple[int, list[str]]]] = {}
        for key, order in entries.items():
            head, n = _split(key)
            if n is not None:
                self._by_head.setdefault(head, []).append((n, order))

    def ranking(self, problem: Problem) -> list[str] | None:
        key = case_key(problem)
        if key in self.entries:
            return self.entries[key]
        head, n = _split(key)
        near = [(abs(n.bit_length() - m.bit_length()), m, order) for m, order in self._by_head.get(head, [])]
        near = [c for c in near if c[0] <= NEAREST_OCTAVES]
        return min(near)[2] if near else None

    @classmethod
    def load(cls, path: Path) -> Table:
        try:
            entries = json.loads(path.read_text())["entries"]
        except (OSError, ValueError, KeyError, TypeError):
            return cls({})
        return cls({key: entry["order"] for key, entry in entries.items()})


_TABLES: dict[str, Table] = {}


def table(name: str) -> Table:
    """The machine's measured table over the shipped one, entry by entry."""
    if name not in _TABLES:
        shipped, measured = Table.load(SHIPPED / f"{name}.json"), Table.load(cache_dir() / f"dispatch-{name}.json")
        _TABLES[name] = Table({**shipped.entries, **measured.entries})
    return _TABLES[name]


@torch._dynamo.assume_constant_result  # file reads and device queries: run, not traced
def ranking(*problem) -> tuple[str, ...]:
    """The backends this machine's table ranks for the Problem (given by its fields: dynamo
    passes only plain values), fastest first; empty without a measurement."""
    problem = Problem(*problem)
    return tuple(table(machine(problem.device)).ranking(problem) or ())
