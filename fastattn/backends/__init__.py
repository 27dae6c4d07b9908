"""The backend registry and dispatch: for backend="auto", the first capable backend in the
order this machine's measurements rank for the call (fastattn.backends.dispatch), else in the
registry's order."""
from __future__ import annotations

import torch

from . import dispatch
from .base import Backend, Capabilities, Problem
from .cpu import CpuBackend
from .cuda import CudaBackend
from .gluon import GluonBackend
from .reference import ReferenceBackend
from .sdpa import SdpaBackend
from .triton import TritonBackend

# The order for backend="auto" where no measurement ranks the call: fastattn's kernels first
# (`cuda` is correct but slower than `triton`; `gluon` only where measured), then torch's, then
# the float64-checked reference.
REGISTRY: dict[str, Backend] = {b.name: b for b in (TritonBackend(), GluonBackend(), CudaBackend(), CpuBackend(),
                                                     SdpaBackend(), ReferenceBackend())}


class NoBackendError(ValueError):
    """No backend (or not the one asked for) can take this call; the message says why."""


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine, in priority order."""
    return [name for name, b in REGISTRY.items() if b.unavailable_reason is None]


def unavailable_backends() -> dict[str, str]:
    """Each backend that cannot run on this machine, with the reason."""
    return {name: why for name, b in REGISTRY.items() if (why := b.unavailable_reason) is not None}


def _reasons(backend: Backend, problem: Problem) -> list[str]:
    why = backend.unavailable_reason
    return [f"unavailable: {why}"] if why is not None else backend.reasons(problem)


_CHOSEN: dict[tuple[str, Problem], Backend] = {}


def select_backend(name: str, problem: Problem) -> Backend:
    """The backend `name` if it can take the problem, or for "auto" the first that can; a
    NoBackendError says why each declined. The registry is fixed once built: answers are kept."""
    if torch.compiler.is_compiling():  # traced: a lookup in a changing dict would guard on it
        return _select(name, problem)
    chosen = _CHOSEN.get((name, problem))
    if chosen is None:
        chosen = _CHOSEN[name, problem] = _select(name, problem)
    return chosen


def _verdicts(name: str, problem: Problem) -> list[tuple[Backend, list[str]]]:
    """(backend, why it declines: empty when it takes the call) for each backend tried, in order,
    up to the first that takes it. A list, not a generator: torch.compile traces this."""
    if name != "auto" and name not in REGISTRY:
        raise ValueError(f"backend: expected 'auto' or one of {list(REGISTRY)}, got {name!r}")
    verdicts = []
    for backend in auto_order(problem) if name == "auto" else [REGISTRY[name]]:
        why = _reasons(backend, problem)
        if not why and name == "auto":
            why = backend.auto_reasons(problem)
        verdicts.append((backend, why))
        if not why:
            break
    return verdicts


def _select(name: str, problem: Problem) -> Backend:
    declined = {}
    for backend, why in _verdicts(name, problem):
        if not why:
            return backend
        declined[backend.name] = why
    lines = "\n".join(f"  {b}: {'; '.join(why)}" for b, why in declined.items())
    raise NoBackendError(f"no backend can run this attention call ({problem}):\n{lines}")


def auto_order(problem: Problem) -> list[Backend]:
    """The backends backend="auto" tries for the problem: the measured ranking, then the rest."""
    ranked = [REGISTRY[n] for n in dispatch.ranking(*problem) if n in REGISTRY]
    return ranked + [b for b in REGISTRY.values() if b not in ranked]


def explain(name: str, problem: Problem) -> str:
    """Which backend `name` takes for the problem, and why: the measured ranking it followed
    (or that there is none) and what each backend tried before it declined."""
    lines = [f"call: {problem}"]
    if name == "auto":
        ranked = dispatch.ranking(*problem)
        where = f"{dispatch.machine(problem.device)} table, case {dispatch.case_key(problem)}"
        lines.append(f"measured ranking ({where}): " + (", ".join(ranked) if ranked else
                                                           "none, so the registry's order: " + ", ".join(REGISTRY)))
    for backend, why in _verdicts(name, problem):
        lines.append(f"  {backend.name}: declines: {'; '.join(why)}" if why else f"-> {backend.name}")
    if not lines[-1].startswith("->"):
        lines.append("-> none: fastattn raises NoBackendError for this call")
    return "\n".join(lines)


__all__ = ["Backend", "Capabilities", "NoBackendError", "Problem", "REGISTRY",
           "available_backends", "explain", "select_backend", "unavailable_backends"]
