"""Kernel launches that bind their arguments once per specialization, not on every call.

`kernel[grid](*args)` re-derives every argument's specialization (a pointer's dtype and 16-byte
alignment, an integer's width, divisibility by 16 and whether it is 1) and hashes them into the
compiled-kernel cache key on every call: ~50 us for the 43 arguments of the forward kernel on
one Xeon core, measured with a driver that launches nothing (tests/triton_mock_driver.py).
`Launcher` sends the first call of each specialization through the JIT, which compiles and
checks everything, and keeps the compiled kernel under a key that is never coarser than the
JIT's; later calls with that key launch the compiled kernel directly, with the same arguments
the JIT would pass. The key: the specialized integers as they are (shapes and strides: a few
values per workload), the tensors' dtypes, and the width of the integers the kernel declares
do_not_specialize. A call with a misaligned tensor, a launch hook set (Triton's profilers) or
the interpreter takes the JIT's path every time.

The direct launch binds CompiledKernel.run's positional layout, which is Triton's internal
business: a release that changed it would mis-bind arguments (illegal addresses), not raise. So
only the Triton minor versions CI checks the layout on (tests/test_triton_launch.py, on the GPU
image's Triton and the newest) launch directly; any other takes the JIT's path every time, and a
launcher whose direct launch raises a binding error goes back to the JIT for good.
"""
from __future__ import annotations

import os

import triton
from triton import knobs
from triton.runtime import driver

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
TESTED_TRITON = ("3.6", "3.9")  # the minor versions whose launch layout CI checks
DIRECT = ".".join(triton.__version__.split(".")[:2]) in TESTED_TRITON
_MAX_ENTRIES = 4096  # distinct shapes x configurations kept per kernel; then start over


def _hooked() -> bool:
    """Whether a launch hook is set: Triton's are chains, empty unless a profiler added one."""
    return any(hook is not None and getattr(hook, "calls", True)
               for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook))


def _width(value) -> int:
    """Triton's integer classes: i32, i64, u64 (floats are always fp32)."""
    if type(value) is not int or -2**31 <= value < 2**31:
        return 0
    return 1 if -2**63 <= value < 2**63 else 2


class Launcher:
    """Launches one jitted kernel. Its arguments are laid out as `tensors` pointers, then
    `specialized` integers, then only integers the kernel declares do_not_specialize and
    floats; the constexprs come after them, in the kernel's order."""

    def __init__(self, kernel, tensors: int, specialized: int):
        self.kernel = kernel
        self.tensors, self.ints_end = tensors, tensors + specialized
        self.compiled: dict[tuple, object] = {}
        self.direct = DIRECT

    def __call__(self, grid: tuple[int, ...], args: tuple, constexprs: tuple, num_warps: int, num_stages: int):
        if INTERPRETING or not self.direct or _hooked():
            return self._jit(grid, args, constexprs, num_warps, num_stages)
        tensors = args[:self.tensors]
        dtypes = tuple([t.dtype for t in tensors if not t.data_ptr() & 15])
        if len(dtypes) < self.tensors:  # a misaligned pointer: specialized per pointer, by the JIT
            return self._jit(grid, args, constexprs, num_warps, num_stages)
        device = driver.active.get_current_device()
        key = (device, constexprs, num_warps, num_stages, args[self.tensors:self.ints_end], dtypes,
               tuple([_width(a) for a in args[self.ints_end:]]))
        compiled = self.compiled.get(key)
        if compiled is None:
            compiled = self._jit(grid, args, constexprs, num_warps, num_stages)
            if len(self.compiled) >= _MAX_ENTRIES:
                self.compiled.clear()
            self.compiled[key] = compiled
            return compiled
        grid_y = grid[1] if len(grid) > 1 else 1
        grid_z = grid[2] if len(grid) > 2 else 1
        try:  # as the JIT launches it, less the launch metadata, which only hooks read
            compiled.run(grid[0], grid_y, grid_z, driver.active.get_current_stream(device), compiled.function,
                         compiled.packed_metadata, None, None, None, *args, *constexprs)
        except (TypeError, ValueError, OverflowError):  # the layout is not this Triton's: the JIT's path
            self.direct = False
            return self._jit(grid, args, constexprs, num_warps, num_stages)
        return compiled

    def _jit(self, grid, args, constexprs, num_warps, num_stages):
        return self.kernel[grid](*args, *constexprs, num_warps=num_warps, num_stages=num_stages)
