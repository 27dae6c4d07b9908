"""Every launch fastattn's Triton glue makes, compiled for sm_90 through Triton's real JIT with no GPU.

The calls go through the public API (fastattn.attention, attention_varlen, attention_with_kvcache,
forward and backward) with CPU tensors, the `triton` backend told it may take them, and the
recording driver of tests/triton_mock_driver.py, which launches nothing: so each kernel the glue
would launch on an H100 is specialised, type-checked and compiled to a cubin exactly as there. The
interpreter checks none of this (it never type-checks; every packed-sequence kernel once failed
to compile while its interpreter tests passed).

The cases: a pairwise covering of the flag axes (no mask, key padding, bool or float attn_mask,
packed; causal, dropout, GQA, window, softcap, ALiBi, sinks, bottom-right), the dtypes (fp16,
bf16, fp32 with 3xTF32, TF32 and IEEE dots) and head dims (16, 64, 80, 128, 256), each case with
one launch configuration per kernel forced, so that every tuning candidate and every shipped
sm_90 config compiles at each head-dim block it fits; short queries take the decode tile by the
tuner's own rule, the shipped defaults by its lookup, and KV-cache decoding compiles its split
and merge kernels over the same axes. Each call runs twice: the second launch goes through
fastattn.triton.launch's cached path and must pass what the JIT passed.

    python tests/triton_compile_matrix.py [--jobs N] [--only SUBSTRING] [--list]

Exit status 1 if any case fails to compile or launch. Run without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import multiprocessing
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

HEAD_DIMS = (16, 64, 80, 128, 256)
DTYPES = ("bf16", "fp16", "fp32")  # fp32: 3xTF32 dots, the default; TF32 and IEEE get a case each
MASKS = ("none", "padding", "bool", "float", "packed")
FLAGS = ("causal", "dropout", "gqa", "window", "softcap", "alibi", "sinks", "bottom_right")
KERNELS = ("fwd", "dkdv", "dq")


@dataclasses.dataclass(frozen=True)
class MatrixCase:
    api: str  # "attention" (varlen when mask == "packed"), "decode" (attention_with_kvcache)
    dtype: str
    D: int
    mask: str = "none"
    flags: frozenset = frozenset()
    configs: tuple = ()  # ((kernel, config), ...) forced; none: the tuner's own choice
    nq: int = 200

    def __str__(self):
        forced = " ".join(f"{k}={','.join(map(str, c))}" for k, c in self.configs) or "tuner"
        return (f"{self.api} {self.dtype} D={self.D} nq={self.nq} mask={self.mask} "
                f"flags={'+'.join(sorted(self.flags)) or '-'} {forced}")


def _pairwise(axes: dict[str, tuple]) -> list[dict]:
    """A small covering array: every pair of values of every two axes appears in some row.
    Greedy and deterministic: each row takes, axis by axis, the value covering most new pairs."""
    names = list(axes)
    uncovered = {((a, x), (b, y)) for a, b in itertools.combinations(names, 2) for x in axes[a] for y in axes[b]}
    rows = []
    while uncovered:
        first = next(iter(sorted(uncovered, key=str)))  # seed each row with a pair still missing
        row = dict(first)
        for name in names:
            if name in row:
                continue
            row[name] = max(axes[name], key=lambda v: sum(((n, row[n]), (name, v)) in uncovered or
                                                          ((name, v), (n, row[n])) in uncovered for n in row))
        uncovered -= {((a, row[a]), (b, row[b])) for a, b in itertools.combinations(names, 2)}
        rows.append(row)
    return rows


def _block_d(D: int) -> int:
    return max(16, 1 << (D - 1).bit_length())


def launch_configs() -> dict[str, list]:
    """Per kernel: the run-time tuning candidates, then the shipped sm_90 defaults not among them."""
    from fastattn.triton import tuning

    shipped = tuning.load_configs(tuning.SHIPPED_DIR / "sm90.json")
    configs = {kernel: list(tuning.CANDIDATES[kernel]) for kernel in KERNELS}
    for key, config in sorted(shipped.items()):
        kernel = key.split("|")[0]
        if config not in configs[kernel]:
            configs[kernel].append(config)
    return configs


def cases() -> list[MatrixCase]:
    from fastattn.triton.tuning import FALLBACK, fits

    configs = launch_configs()
    todo = {(k, c, bd) for k, cs in configs.items() for c in cs for bd in (64, 128, 256) if fits(c, bd)}
    rotation = itertools.cycle(HEAD_DIMS)

    def open_configs(D: int) -> int:
        return sum(any((k, c, _block_d(D)) in todo for c in configs[k]) for k in KERNELS)

    def forced(D: int) -> tuple:
        """One config per kernel that fits D, the first whose (kernel, config, block) is still to do."""
        picks = []
        for kernel in KERNELS:
            fitting = [c for c in configs[kernel] if fits(c, _block_d(D))]
            pick = next((c for c in fitting if (kernel, c, _block_d(D)) in todo), fitting[0])
            todo.discard((kernel, pick, _block_d(D)))
            picks.append((kernel, pick))
        return tuple(picks)

    def head_dim() -> int:
        """The next head dim in turn that still has configs to compile, if any has."""
        for _ in HEAD_DIMS:
            D = next(rotation)
            if open_configs(D) or not todo:
                return D
        return D

    out = []
    axes = {"dtype": ("bf16", "fp16"), "mask": MASKS, **{f: (False, True) for f in FLAGS}}
    for row in _pairwise(axes):
        D = head_dim()
        out.append(MatrixCase("attention", row["dtype"], D, row["mask"], frozenset(f for f in FLAGS if row[f]), forced(D)))
    extra = itertools.cycle([("bf16", "padding", {"causal"}), ("fp16", "packed", {"causal", "window"}),
                             ("bf16", "bool", {"softcap", "alibi"}), ("fp16", "float", {"sinks", "dropout"})])
    while todo:  # configs the covering left out, each with a flag set in turn
        D = head_dim()
        dtype, mask, flags = next(extra)
        out.append(MatrixCase("attention", dtype, D, mask, frozenset(flags), forced(D)))
    # fp32 by its three dot precisions (3xTF32 the default), which compile slowest: from a head-dim
    # block of 128 on, the fallbacks (every candidate is over shared memory there; the 16-bit cases
    # walk the glue from a config out of shared memory to the next)
    mods = frozenset({"causal", "window", "softcap", "alibi", "sinks"})
    fallback = tuple(FALLBACK.items())
    out += [MatrixCase("attention", "fp32", 64, "padding", mods, forced(64)),
            MatrixCase("attention", "fp32", 128, "packed", frozenset({"causal", "dropout", "gqa"}), fallback),
            MatrixCase("attention", "fp32", 256, "bool", frozenset({"bottom_right", "causal"}), fallback),
            MatrixCase("attention", "fp32-tf32", 80, "float", frozenset({"softcap"}), fallback),
            MatrixCase("attention", "fp32-ieee", 16, "none", frozenset({"causal"}), forced(16))]
    # The tuner's own choice: the decode tile (<= 16 queries) and the shipped defaults' lookup.
    out += [MatrixCase("attention", "bf16", 128, "padding", frozenset({"causal"}), nq=8),
            MatrixCase("attention", "fp16", 64, "packed", frozenset({"causal", "alibi"}), nq=16),
            MatrixCase("attention", "bf16", 128, "padding", frozenset({"causal", "softcap"}), nq=3000)]
    decode_axes = {"dtype": DTYPES, "D": (16, 64, 128, 256), "queries": (1, 4, 16),
                   **{f: (False, True) for f in ("causal", "gqa", "window", "softcap", "alibi", "sinks")}}
    for row in _pairwise(decode_axes):
        flags = frozenset(f for f in decode_axes if row.get(f) is True)
        out.append(MatrixCase("decode", row["dtype"], row["D"], "none", flags, nq=row["queries"]))
    out.append(MatrixCase("dropout-mask", "bf16", 64))
    return out


# --------------------------------------------------------------------------- running a case
def _setup() -> None:
    """The recording driver, and the `triton` backend allowed CPU tensors, as on an sm_90 GPU."""
    sys.path.insert(0, str(Path(__file__).parent))
    import triton_mock_driver

    triton_mock_driver.activate()
    from fastattn.backends import REGISTRY
    from fastattn.triton import decode, tuning

    triton = REGISTRY["triton"]
    type(triton).caps = dataclasses.replace(triton.caps, devices=frozenset({"cpu", "cuda"}))
    triton.unavailable_reason = None
    decode._multiprocessors = lambda device: 132  # an H100's SMs: the split decision of a real GPU
    tuning.gpu_arch = lambda: "sm90"
    cache = Path(tempfile.mkdtemp()) / "tuned.json"
    tuning.cache_path = lambda: cache
    os.environ["FASTATTN_TUNE"] = "0"  # a key the shipped table lacks takes the first candidate, untimed


def _inputs(case: MatrixCase):
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(case.dtype, torch.float32)
    B, H = 2, 4
    Hkv = 2 if "gqa" in case.flags else H
    nk = case.nq + 37 if case.api == "attention" else 300
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, case.nq, case.D, generator=g, dtype=dtype)
    k, v = (torch.randn(B, Hkv, nk, case.D, generator=g, dtype=dtype) for _ in range(2))
    return q, k, v


def _mods(case: MatrixCase, B: int, H: int) -> dict:
    import torch

    mods = {}
    if "window" in case.flags:
        mods["window_size"] = (40, 0 if "causal" in case.flags else 17)
    if "softcap" in case.flags:
        mods["softcap"] = 30.0
    if "alibi" in case.flags:
        mods["alibi_slopes"] = torch.rand(B, H) if case.mask == "packed" else torch.rand(H)
    if "sinks" in case.flags:
        mods["sinks"] = torch.randn(H, requires_grad=case.api == "attention")
    if "bottom_right" in case.flags:
        mods["align"] = "bottom_right"
    elif case.mask == "packed":
        mods["align"] = "top_left"
    return mods


def _call(case: MatrixCase):
    """The case's call, forward and (but for decoding) backward, through the public API."""
    import torch

    import fastattn

    q, k, v = _inputs(case)
    B, H, nq, D = q.shape
    causal = "causal" in case.flags
    mods = _mods(case, B, H)
    if case.api == "dropout-mask":  # the keep mask the tests compare the kernels' dropout with
        from fastattn.triton.attention import dropout_keep_mask

        dropout_keep_mask(1234, B, H, nq, k.shape[2], 0.1, q.device)
        return
    if case.api == "decode":
        seqlens = torch.tensor([300 - 2 * case.nq, 123], dtype=torch.int32)
        new = k[:, :, :case.nq].clone(), v[:, :, :case.nq].clone()
        fastattn.attention_with_kvcache(q, k, v, seqlens, k_new=new[0], v_new=new[1], causal=causal,
                                        backend="triton", **mods)
        return
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    dropout = 0.1 if "dropout" in case.flags else 0.0
    if case.mask == "packed":  # two sequences of different lengths, each from one row of the batch
        nk = k.shape[2]
        sq, sk = nq // 2 + 1, nk // 2 + 3
        cu_q, cu_k = (torch.tensor([0, n, n + s], dtype=torch.int32) for n, s in ((nq, sq), (nk, sk)))
        qp = torch.cat([q[0, :, :nq], q[1, :, :sq]], 1).transpose(0, 1)
        kp, vp = (torch.cat([t[0], t[1, :, :sk]], 1).transpose(0, 1) for t in (k, v))
        out = fastattn.attention_varlen(qp, kp, vp, cu_q, cu_k, nq, nk, causal=causal, dropout_p=dropout,
                                        backend="triton", **mods)
    else:
        masks = {}
        if case.mask == "padding":
            keep = torch.arange(k.shape[2]) < torch.tensor([[k.shape[2]], [k.shape[2] - 50]])
            masks["key_padding_mask"] = ~keep
        elif case.mask == "bool":
            masks["attn_mask"] = torch.rand(B, 1, nq, k.shape[2]) > 0.2
        elif case.mask == "float":
            masks["attn_mask"] = torch.randn(B, H, nq, k.shape[2])
        out = fastattn.attention(q, k, v, causal=causal, dropout_p=dropout, backend="triton", **masks, **mods)
    out.float().sum().backward()


def _launching_kernel(error: BaseException) -> str | None:
    """The tuning name ("fwd", "dkdv", "dq") of the kernel whose launch raised error."""
    frame = error.__traceback__
    while frame is not None:
        if frame.tb_frame.f_code.co_name == "_launch":
            return frame.tb_frame.f_locals.get("name")
        frame = frame.tb_next
    return None


def run_case(case: MatrixCase) -> tuple[str, str]:
    """("ok" | "FAIL", detail): compiles and launches the case twice, through the JIT and then
    through the launcher's cache, which must pass the same arguments."""
    import torch

    import triton_mock_driver
    from fastattn.triton import tuning
    from triton.runtime.errors import OutOfResources

    launches = triton_mock_driver.RecordingLauncher.launches
    precision = {"fp32-tf32": "tf32", "fp32-ieee": "ieee"}.get(case.dtype, "none")
    torch.backends.cuda.matmul.fp32_precision = precision
    tuning.TUNER.force = dict(case.configs)
    start, declined = time.perf_counter(), []
    try:
        while True:
            try:
                launches.clear()
                _call(case)
                break
            except OutOfResources as e:  # too much shared memory here: the glue takes the next config
                kernel = _launching_kernel(e)
                if kernel not in tuning.TUNER.force:
                    raise
                declined.append(f"{kernel}={','.join(map(str, tuning.TUNER.force.pop(kernel)))}")
        first = list(launches)
        launches.clear()
        _call(case)
        if [(a[:3], len(a[3])) for a in first] != [(b[:3], len(b[3])) for b in launches]:
            return "FAIL", f"{case}: the cached launches differ from the JIT's"
        note = f"; over shared memory, the glue took the next config: {' '.join(declined)}" if declined else ""
        return "ok", f"{case} ({len(first)} launches, {time.perf_counter() - start:.1f} s{note})"
    except Exception:  # noqa: BLE001 - each failure is reported, with its traceback
        return "FAIL", f"{case}\n{traceback.format_exc(limit=-6)}"
    finally:
        tuning.TUNER.force = {}
        torch.backends.cuda.matmul.fp32_precision = "none"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/triton_compile_matrix.py")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--only", default="", help="cases whose description contains this")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("run without TRITON_INTERPRET: the interpreter compiles nothing")
    todo = [c for c in cases() if args.only in str(c)]
    if args.list:
        print("\n".join(map(str, todo)), f"\n{len(todo)} cases", sep="")
        return 0
    import triton

    start, failures = time.perf_counter(), 0
    with multiprocessing.get_context("fork").Pool(args.jobs, initializer=_setup) as pool:
        for status, detail in pool.imap_unordered(run_case, todo):
            failures += status != "ok"
            print(status, detail, flush=True)
    print(f"triton {triton.__version__}: {len(todo) - failures} of {len(todo)} cases compiled and launched "
          f"in {time.perf_counter() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
