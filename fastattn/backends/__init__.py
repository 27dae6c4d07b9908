"""The backend registry and dispatch: the first capable backend in priority order wins."""
from __future__ import annotations

import torch

from .base import Backend, Capabilities, Masks, Problem
from .cpu import CpuBackend
from .cuda import CudaBackend
from .reference import ReferenceBackend
from .triton import TritonBackend

# Priority order for backend="auto": fastest first (`cuda` is correct but slower than `triton`).
REGISTRY: dict[str, Backend] = {b.name: b for b in (TritonBackend(), CudaBackend(), CpuBackend(), ReferenceBackend())}


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


def _select(name: str, problem: Problem) -> Backend:
    if name != "auto" and name not in REGISTRY:
        raise ValueError(f"backend: expected 'auto' or one of {list(REGISTRY)}, got {name!r}")
    candidates = list(REGISTRY.values()) if name == "auto" else [REGISTRY[name]]
    declined = {}
    for backend in candidates:
        why = _reasons(backend, problem)
        if not why and name == "auto":
            why = backend.auto_reasons(problem)
        if not why:
            return backend
        declined[backend.name] = why
    lines = "\n".join(f"  {b}: {'; '.join(why)}" for b, why in declined.items())
    raise NoBackendError(f"no backend can run this attention call ({problem}):\n{lines}")


__all__ = ["Backend", "Capabilities", "Masks", "NoBackendError", "Problem", "REGISTRY",
           "available_backends", "select_backend", "unavailable_backends"]
