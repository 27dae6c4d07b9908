"""A Triton driver that compiles for an H100-class GPU (sm_90) and launches nothing: it records
each launch's grid and arguments. With it the JIT's own launch path runs on a machine with no
GPU, so fastattn.triton.launch can be checked against it (tests/test_triton_launch.py) and its
host time measured (`python tests/triton_mock_driver.py`). Outside TRITON_INTERPRET only."""
from __future__ import annotations

import time

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver


class _Utils:
    def load_binary(self, name, kernel, shared, device):
        return 1, 2, 64, 0, 1024  # module, function, registers, spills, max threads

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32}


class RecordingLauncher:
    """Called as Triton's CUDA launcher is; calls the hooks as it does."""
    launches: list[tuple] = []  # (grid x, y, z, the kernel's arguments)

    def __init__(self, src, metadata):
        pass

    def __call__(self, grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata,
                 enter_hook, exit_hook, *args):
        if enter_hook is not None:
            enter_hook(launch_metadata)
        RecordingLauncher.launches.append((grid_x, grid_y, grid_z, args))
        if exit_hook is not None:
            exit_hook(launch_metadata)


class RecordingDriver:
    def __init__(self):
        self.utils = _Utils()
        self.launcher_cls = RecordingLauncher

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True

    def map_python_to_cpp_type(self, ty):
        return ty


def activate() -> None:
    driver.set_active(RecordingDriver())


def _host_time() -> None:
    """Host time of one small forward (1, 8, 16, 64): the whole glue with fastattn's launcher,
    and the launch alone through the JIT and through the launcher."""
    activate()
    from fastattn.call import Call
    from fastattn.triton import attention

    q, k, v = (torch.randn(1, 8, 16, 64) for _ in range(3))
    out, lse = torch.empty_like(q), torch.empty(1, 8, 16)

    def forward():
        attention.forward(q, k, v, out, lse, Call(scale=0.125))

    launcher, seen = attention._FWD, []

    class Spy:
        def __call__(self, *call):
            seen.append(call)
            return launcher(*call)

    attention._FWD = Spy()
    forward()  # compiles
    attention._FWD = launcher
    call = seen[0]
    for name, run in (("glue + cached launch", forward), ("launch through the JIT", lambda: launcher._jit(*call)),
                      ("cached launch", lambda: launcher(*call))):
        print(f"{name:24s} {min(_time(run) for _ in range(5)):6.1f} us")


def _time(run, n: int = 2000) -> float:
    start = time.perf_counter()
    for _ in range(n):
        run()
    return (time.perf_counter() - start) / n * 1e6


if __name__ == "__main__":
    _host_time()
