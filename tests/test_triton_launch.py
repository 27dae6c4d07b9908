"""fastattn.triton.launch: the cached launcher passes what Triton's JIT passes, and never reuses
a compiled kernel for arguments the JIT would specialize differently.

The JIT's path needs a driver: a subprocess compiles for sm_90 with a recording driver
(tests/triton_mock_driver.py) on small kernels, one with argument groups (tuples). The layouts the
attention kernels are launched with (runtime arguments: tensors, argument groups, the
do_not_specialize integers, each alone; then the constexprs) are checked on every launch of the
interpreter tests' calls."""
import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastattn

pytest.importorskip("triton")
from fastattn.triton import launch  # noqa: E402
from fastattn.triton.attention import UNSPECIALIZED  # noqa: E402
from fastattn.triton.launch import unspecialized_params  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

JIT_VS_CACHED = textwrap.dedent('''
    import torch, triton, triton.language as tl
    import triton_mock_driver as mock
    from triton import knobs
    from fastattn.triton.launch import Launcher

    mock.activate()

    @triton.jit(do_not_specialize=["n", "seed"])
    def scale_rows(X, Y, stride_x, stride_y, n, seed, alpha, D: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        x = tl.load(X + row * stride_x + offs, mask=offs < D)
        tl.store(Y + row * stride_y + offs, x * alpha + (seed % 7 + n).to(tl.float32), mask=offs < D)

    launcher = Launcher(scale_rows)
    assert launcher.unspecialized == (False, False, False, False, True, True, False)
    launches = mock.RecordingLauncher.launches
    x, y = torch.randn(64, 33), torch.empty(64, 32)

    def call(x, y, n=64, seed=5, alpha=0.5, D=32):
        return launcher((x.shape[0],), (x, y, x.stride(0), y.stride(0), n, seed, alpha), (D, 32), 4, 2)

    def jit_choice(x, y, n=64, seed=5, alpha=0.5, D=32):
        return launcher._jit((x.shape[0],), (x, y, x.stride(0), y.stride(0), n, seed, alpha), (D, 32), 4, 2)

    first = call(x, y)
    via_jit = launches[-1]
    assert call(x, y) is first and len(launcher.compiled) == 1
    assert launches[-1][:3] == via_jit[:3] == (64, 1, 1)
    direct = launches[-1][3]
    assert len(direct) == len(via_jit[3]) == 9 and all(a is b or a == b for a, b in zip(direct, via_jit[3])), \\
        (direct, via_jit[3])
    assert call(x, y, n=7, seed=11, alpha=2.0) is first  # do_not_specialize and floats: same kernel
    assert launches[-1][3][4:7] == (7, 11, 2.0)

    # Each variation the JIT specializes on gets the kernel the JIT picks, never `first`.
    wide = torch.randn(64, 48)
    variations = {
        "row stride divisible by 16": dict(x=wide, y=y),
        "row stride 1": dict(x=torch.randn(64, 1), y=y, D=1),
        "misaligned pointer": dict(x=torch.randn(64 * 33 + 1)[1:].view(64, 33), y=y),
        "64-bit seed": dict(x=x, y=y, seed=2**40),
        "unsigned 64-bit seed": dict(x=x, y=y, seed=2**63 + 1),
        "constexpr": dict(x=x, y=y, D=16),
        "dtype": dict(x=x.double(), y=y),
    }
    for name, kw in variations.items():
        used = call(**kw)
        again = call(**kw)
        picked = jit_choice(**kw)
        assert used is picked and again is picked, name
        assert picked is not first, name

    # A launch hook (a profiler) sees every launch: the JIT's path.
    hooked = []
    knobs.runtime.launch_enter_hook.add(hooked.append)
    call(x, y)
    knobs.runtime.launch_enter_hook.remove(hooked.append)
    assert len(hooked) == 1

    # A direct launch that raises a binding error (a Triton whose layout changed) gives way to the
    # JIT, which launches; so does every later call, as on a Triton CI has not checked.
    real_run, calls = first.run, []

    def changed_layout(*args):  # the direct launch's binding fails once; the JIT's then launches
        calls.append(args)
        if len(calls) == 1:
            raise TypeError("function takes exactly 12 arguments")
        return real_run(*args)

    attr = "_run" if isinstance(getattr(type(first), "run", None), property) else "run"
    setattr(first, attr, changed_layout)
    count = len(launches)
    call(x, y)
    assert len(calls) == 2 and len(launches) == count + 1 and not launcher.direct
    call(x, y)  # through the JIT: its launch passes launch metadata the direct one leaves out
    assert len(calls) == 3 and len(launches) == count + 2
    setattr(first, attr, real_run)
    untested = Launcher(scale_rows)
    untested.direct = False
    untested((64,), (x, y, x.stride(0), y.stride(0), 64, 5, 0.5), (32, 32), 4, 2)
    assert not untested.compiled and len(launches) == count + 3

    # Argument groups: tuples of a tensor and its strides, of sizes. Triton specializes a tuple's
    # integers (on 1 and on divisibility by 16) even where the kernel declares the tuple
    # do_not_specialize; the launcher's key tells those kernels apart too.
    @triton.jit(do_not_specialize=["sizes", "seed"])
    def grouped(X, Y, sizes, seed, SCALARS, D: tl.constexpr, BLOCK: tl.constexpr):
        x_ptr, stride_x = X
        y_ptr, stride_y = Y
        n, m = sizes
        alpha, beta = SCALARS
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + offs, mask=offs < D)
        tl.store(y_ptr + row * stride_y + offs, x * alpha + beta + (seed % 7 + n * m).to(tl.float32), mask=offs < D)

    grouped_launcher = Launcher(grouped)
    assert grouped_launcher.unspecialized == (False, False, True, True, False)

    def args(x=x, y=y, sizes=(64, 3), seed=5, scalars=(0.5, 1.0)):
        return (x, x.stride(0)), (y, y.stride(0)), sizes, seed, scalars

    def gcall(**kw):
        return grouped_launcher((64,), args(**kw), (32, 32), 4, 2)

    def gjit(**kw):
        return grouped_launcher._jit((64,), args(**kw), (32, 32), 4, 2)

    gfirst = gcall()
    via_jit = launches[-1]
    assert gcall() is gfirst and len(grouped_launcher.compiled) == 1
    assert len(launches[-1][3]) == len(via_jit[3]) == 7 and launches[-1][3][:5] == via_jit[3][:5], \
        (launches[-1][3], via_jit[3])
    assert gcall(seed=11, scalars=(2.0, 3.0)) is gfirst  # do_not_specialize and floats: same kernel
    assert launches[-1][3][3:5] == (11, (2.0, 3.0))
    for name, kw in {"a tuple's integer 1": dict(sizes=(64, 1)),
                     "a tuple's integer divisible by 16": dict(sizes=(64, 32)),
                     "a tuple's stride divisible by 16": dict(x=wide),
                     "a tuple's misaligned pointer": dict(x=torch.randn(64 * 33 + 1)[1:].view(64, 33)),
                     "a tuple's dtype": dict(x=x.double())}.items():
        used, again, picked = gcall(**kw), gcall(**kw), gjit(**kw)
        assert used is picked and again is picked and picked is not gfirst, name
    assert gcall(sizes=(48, 3)) is gcall(sizes=(64, 3))  # both divisible by 16: one kernel, as the JIT's
    print("ok")
''')


def test_cached_launch_matches_the_jit(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT), env.get("PYTHONPATH", "")])
    env["TRITON_CACHE_DIR"] = env.get("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))
    script = tmp_path / "jit_vs_cached.py"
    script.write_text(JIT_VS_CACHED)
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


def test_only_the_triton_versions_ci_checks_launch_directly(monkeypatch):
    import triton

    minor = ".".join(triton.__version__.split(".")[:2])
    assert launch.DIRECT == (minor in launch.TESTED_TRITON)
    assert minor in launch.TESTED_TRITON, f"CI runs triton {triton.__version__}: check its layout, then add it"


def _param_kinds(kernel):
    """(name, is constexpr) of each parameter of a jitted or interpreted kernel."""
    params = inspect.signature(kernel.fn).parameters.values()
    return [(p.name, "constexpr" in str(p.annotation)) for p in params]


def _items(arg):
    return arg if type(arg) is tuple else (arg,)


@pytest.fixture
def checked_launches(monkeypatch):
    """Every launch of the attention kernels, checked against its kernel's parameters: the
    do_not_specialize ones (UNSPECIALIZED) integers passed alone (Triton would specialize them in a
    group), the others tensors, numbers or groups of them, then the constexprs."""
    seen = []
    call = launch.Launcher.__call__

    def checking(self, grid, args, constexprs, num_warps, num_stages):
        kinds = _param_kinds(self.kernel)
        name = self.kernel.fn.__name__
        assert len(args) + len(constexprs) == len(kinds), name
        assert not any(c for _, c in kinds[:len(args)]) and all(c for _, c in kinds[len(args):]), name
        assert self.unspecialized == unspecialized_params(self.kernel) and len(self.unspecialized) == len(args)
        for arg, (pname, _), unspecialized in zip(args, kinds, self.unspecialized):
            assert unspecialized == (pname in UNSPECIALIZED), (name, pname)
            if unspecialized:
                assert type(arg) is int, (name, pname, arg)
            else:
                assert all(isinstance(a, torch.Tensor) or type(a) in (int, float) for a in _items(arg)), (name, pname)
        seen.append(name)
        return call(self, grid, args, constexprs, num_warps, num_stages)

    monkeypatch.setattr(launch.Launcher, "__call__", checking)
    return seen


@pytest.mark.skipif("triton" not in fastattn.available_backends(), reason="triton backend unavailable")
def test_attention_kernels_launch_with_their_layouts(checked_launches):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    q = torch.randn(2, 4, 20, 16, device=device, requires_grad=True)
    k, v = (torch.randn(2, 2, 24, 16, device=device, requires_grad=True) for _ in range(2))
    kpm = torch.rand(2, 24, device=device) < 0.3
    mask = torch.rand(20, 24, device=device) < 0.8
    out = fastattn.attention(q, k, v, key_padding_mask=kpm, attn_mask=mask, causal=True, dropout_p=0.1,
                             backend="triton")
    out.sum().backward()
    cu = torch.tensor([0, 7, 20], dtype=torch.int32, device=device)
    packed_q, packed_k, packed_v = (torch.randn(20, h, 16, device=device) for h in (4, 2, 2))
    fastattn.attention_varlen(packed_q, packed_k, packed_v, cu, cu, 13, 13, causal=True, backend="triton")
    k_cache, v_cache = (torch.randn(2, 2, 64, 16, device=device) for _ in range(2))
    lengths = torch.tensor([5, 40], dtype=torch.int32, device=device)
    with torch.no_grad():
        fastattn.attention_with_kvcache(q[:, :, :1], k_cache, v_cache, lengths, backend="triton")
    assert set(checked_launches) >= {"_fwd_kernel", "_bwd_preprocess", "_bwd_dkdv_kernel", "_bwd_dq_kernel",
                                     "_decode_split_kernel", "_decode_merge_kernel"}, checked_launches
