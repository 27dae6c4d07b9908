"""Kernel launches that bind their arguments once per specialization, not on every call.

`kernel[grid](*args)` re-derives every argument's specialization (a pointer's dtype and 16-byte
alignment, an integer's width, divisibility by 16 and whether it is 1) and hashes them into the
compiled-kernel cache key on every call: ~50 us for the forward kernel's 44 arguments (its 18
groups and single arguments flattened) on one Xeon core, measured with a driver that launches
nothing (tests/triton_mock_driver.py).
`Launcher` sends the first call of each specialization through the JIT, which compiles and
checks everything, and keeps the compiled kernel under a key that is never coarser than the
JIT's; later calls with that key launch the compiled kernel directly, with the same arguments
the JIT would pass. The key: the specialized integers as they are (shapes and strides: a few
values per workload), the tensors' dtypes, and the width of the integers the kernel declares
do_not_specialize; the elements of a tuple argument (an argument group) count as single
arguments do, but that Triton specializes a tuple's integers even where the kernel declares the
tuple do_not_specialize (3.6 to 3.9), so those count as they are too. A call with a misaligned
tensor, a launch hook set (Triton's profilers) or the interpreter takes the JIT's path every time.

The direct launch binds CompiledKernel.run's positional layout, which is Triton's internal
business: a release that changed it would mis-bind arguments (illegal addresses), not raise. So
only the Triton minor versions CI checks the layout on (tests/test_triton_launch.py, on the GPU
image's Triton and the newest) launch directly; any other takes the JIT's path every time, and a
launcher whose direct launch raises a binding error goes back to the JIT for good.
"""
from __future__ import annotations

import inspect
import os

import triton
from triton import knobs
from triton.runtime import driver

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
TESTED_TRITON = ("3.6", "3.9")  # the minor versions whose launch layout CI checks
DIRECT = ".".join(triton.__version__.split(".")[:2]) in TESTED_TRITON
_MAX_ENTRIES = 4096  # distinct shapes x configurations kept per kernel; then start over
_UNSPECIALIZED, _TENSOR, _NUMBERS, _FLOATS = -1, -2, -3, -4  # see Launcher._layout_of


def _hooked() -> bool:
    """Whether a launch hook is set: Triton's are chains, empty unless a profiler added one."""
    return any(hook is not None and getattr(hook, "calls", True)
               for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook))


def _width(value) -> int:
    """Triton's integer classes: i32, i64, u64 (floats are always fp32: -1)."""
    if type(value) is not int:
        return -1 if type(value) is float else 0
    if -2**31 <= value < 2**31:
        return 0
    return 1 if -2**63 <= value < 2**63 else 2


def unspecialized_params(kernel) -> tuple[bool, ...]:
    """For each runtime (not constexpr) parameter of a jitted (or interpreted) kernel, in order:
    whether the kernel declares it do_not_specialize (by name or position)."""
    declared = getattr(kernel, "do_not_specialize", None)
    if declared is None:  # the interpreter's function keeps the decorator's arguments
        declared = getattr(kernel, "kwargs", {}).get("do_not_specialize")
    declared = set(declared or ())
    params = inspect.signature(kernel.fn).parameters.values()
    return tuple(p.name in declared or i in declared for i, p in enumerate(params)
                 if "constexpr" not in str(p.annotation))


def _key_function(layout: tuple[int, ...]):
    """Launcher.key for one layout, unrolled (as Triton's binder is): this is most of a cached
    launch's host time, a loop over the arguments and their groups ~1.5x it."""
    tensors, parts = [], []
    for i, lead in enumerate(layout):
        if lead > 0:
            tensors += [f"a{i}[{j}]" for j in range(lead)]
            parts.append(f"a{i}[{lead}:]")
        elif lead == _NUMBERS:
            parts.append(f"a{i}")
        elif lead == _FLOATS:  # by their types (all float: one key whatever their values)
            parts.append(f"tuple(map(type, a{i}))")
        elif lead == _TENSOR:
            tensors.append(f"a{i}")
        else:
            parts.append(f"(0 if type(a{i}) is int and -2147483648 <= a{i} < 2147483648 else _width(a{i}))")
    names = [f"t{j}" for j in range(len(tensors))]
    source = (f"def key({', '.join(f'a{i}' for i in range(len(layout)))}):\n"
              + (f"    {', '.join(names)}, = {', '.join(tensors)},\n"
                 f"    if ({' | '.join(f'{t}.data_ptr()' for t in names)}) & 15:\n"
                 f"        return None\n" if tensors else "")
              + f"    return ({''.join(f'{t}.dtype, ' for t in names)}{''.join(f'{p}, ' for p in parts)})\n")
    scope = {"_width": _width}
    exec(source, scope)  # noqa: S102 - generated from the layout's integer codes only
    return scope["key"]


class Launcher:
    """Launches one jitted kernel: its runtime arguments (tensors, integers, floats, and tuples of
    them, the argument groups Triton flattens), then its constexprs, in the kernel's order. What
    the key needs of each argument comes from the kernel's signature: a parameter declared
    do_not_specialize (a single integer) counts by its width; any other integer, a tuple's
    included (Triton specializes those whatever do_not_specialize says), as it is; a tensor by its
    dtype, provided it is 16-byte aligned. Where a group's tensors end is the first call's layout
    (_layout_of), from which key() is generated."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.unspecialized = unspecialized_params(kernel)
        self.layout = None  # see _layout_of: the first direct call's
        self._key = None  # key() for that layout
        self.compiled: dict[tuple, object] = {}
        self.direct = DIRECT

    def key(self, args: tuple):
        """The specializations of args that tell compiled kernels apart, or None where a tensor is
        misaligned (specialized per pointer, by the JIT): each tensor's dtype; the numbers that
        follow a group's tensors as they are (a slice); the widths of the do_not_specialize
        integers. Which elements are tensors is the layout the glue gave the first call (`layout`);
        a call laid out otherwise never matches a key of it (see __call__), so goes to the JIT."""
        if self._key is None:
            self._key = _key_function(self.layout)
        return self._key(*args)

    def _layout_of(self, args: tuple) -> tuple[int, ...]:
        """Per runtime argument: _UNSPECIALIZED (a do_not_specialize integer, or a float: by its
        width), _TENSOR (a tensor alone), _NUMBERS (an integer, or a group of numbers), _FLOATS (a
        group of floats), or a group's count of leading tensors, numbers after them. () where a
        group has a tensor after a number: no direct launch."""
        layout = []
        for arg, unspecialized in zip(args, self.unspecialized):
            if (unspecialized and type(arg) is not tuple) or type(arg) is float:  # a tuple: specialized anyway
                layout.append(_UNSPECIALIZED)
            elif type(arg) is not tuple:
                layout.append(_NUMBERS if type(arg) is int else _TENSOR)
            else:
                lead = next((i for i, a in enumerate(arg) if type(a) in (int, float)), len(arg))
                if any(type(a) not in (int, float) for a in arg[lead:]):
                    return ()
                if lead == 0 and all(type(a) is float for a in arg):
                    lead = _FLOATS
                layout.append(lead or _NUMBERS)
        return tuple(layout)

    def __call__(self, grid: tuple[int, ...], args: tuple, constexprs: tuple, num_warps: int, num_stages: int):
        if INTERPRETING or not self.direct or _hooked():
            return self._jit(grid, args, constexprs, num_warps, num_stages)
        if self.layout is None:
            self.layout = self._layout_of(args)
        try:
            spec = self.key(args) if self.layout else None
        except (AttributeError, TypeError, IndexError, ValueError):  # laid out otherwise: the JIT's path
            spec = None
        if spec is None:  # a misaligned pointer, or no layout
            return self._jit(grid, args, constexprs, num_warps, num_stages)
        device = driver.active.get_current_device()
        key = (device, constexprs, num_warps, num_stages, spec)
        compiled = self.compiled.get(key)
        if compiled is None:
            compiled = self._jit(grid, args, constexprs, num_warps, num_stages)
            if self._layout_of(args) != self.layout:  # a key of another layout: not kept
                return compiled
            if len(self.compiled) >= _MAX_ENTRIES:
                self.compiled.clear()
            self.compiled[key] = compiled
            return compiled
        grid_y = grid[1] if len(grid) > 1 else 1
        grid_z = grid[2] if len(grid) > 2 else 1
        try:  # as the JIT launches it (tuples as they are), less the launch metadata, which only hooks read
            compiled.run(grid[0], grid_y, grid_z, driver.active.get_current_stream(device), compiled.function,
                         compiled.packed_metadata, None, None, None, *args, *constexprs)
        except (TypeError, ValueError, OverflowError, SystemError):  # not this Triton's layout: the JIT's path
            self.direct = False
            return self._jit(grid, args, constexprs, num_warps, num_stages)
        return compiled

    def _jit(self, grid, args, constexprs, num_warps, num_stages):
        return self.kernel[grid](*args, *constexprs, num_warps=num_warps, num_stages=num_stages)
