"""Launch configurations (BLOCK_M, BLOCK_N, num_warps, num_stages) for the Triton kernels.

A configuration is looked up by a key of kernel, dtype, head dim, mask kind and the *length
buckets* of Nq and Nk (powers of two), so sequences of every length in a bucket share one
compile and one tuning. In order:
  1. decoding shapes (Nq <= 16) take a rule: 16-query tiles, no tuning;
  2. this machine's cache (~/.cache/fastattn, or $FASTATTN_CACHE_DIR) and the defaults shipped in
     fastattn/triton/tuned/sm<arch>.json (written by `python -m fastattn tune`), exact key first, then
     the shipped entry of the nearest length bucket: one compile per kernel, no tuning;
  3. else a short tuning over CANDIDATES, remembered in this machine's cache (FASTATTN_TUNE=0
     takes the first candidate instead).
Steps 2 and 3 take only configs a GPU of this architecture has checked against float64 with this
Triton minor version (the manifest fastattn/triton/tuned/checked-<arch>.json, written by
`python -m fastattn.bench.triton_checked`): one miscompiled on an H200 while the
interpreter ran it right. Without a manifest, or where no checked config fits, the first candidate
that fits runs, untimed. A config out of shared memory gives way to the next candidate, the last
to FALLBACK.
`TUNINGS` counts the tunings run in this process.
"""
from __future__ import annotations

import collections
import json
import math
import os
import statistics
import tempfile
from pathlib import Path

import torch

Config = tuple[int, int, int, int]  # BLOCK_M, BLOCK_N, num_warps, num_stages

# What a run-time tuning tries, per kernel, best first (the H200 sweep's usual winners): configs
# that compile for sm_90 without spilling at D = 64 and 128 (python -m fastattn report) and
# give right results there (test_gpu). dK/dV at (32, 128, 8 warps) gave wrong dK at D = 128 in
# 16 bits on an H200 (triton 3.6): left out. dK/dV at (32, 64, 8 warps) is the one that holds
# every score modifier at D = 128 without spilling (triton 3.6 and 3.9).
CANDIDATES: dict[str, list[Config]] = {
    "fwd": [(64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 32, 4, 2)],
    "dkdv": [(64, 64, 4, 2), (64, 64, 4, 3), (32, 64, 4, 2), (16, 64, 4, 2), (32, 64, 8, 2)],
    "dq": [(128, 64, 8, 3), (128, 32, 8, 2), (64, 64, 4, 2)],
}
# The wider space `python -m fastattn tune` sweeps.
SWEEP: dict[str, list[Config]] = {
    "fwd": sorted({(m, n, w, s) for m in (64, 128) for n in (64, 128) for w in (4, 8) for s in (2, 3)}
                  | set(CANDIDATES["fwd"])),
    "dkdv": sorted({(m, n, w, s) for m in (32, 64) for n in (64, 128) for w in (4, 8) for s in (2, 3)}
                   - {(32, 128, 8, 2), (32, 128, 8, 3)} | set(CANDIDATES["dkdv"])),
    "dq": sorted({(m, n, w, s) for m in (64, 128) for n in (32, 64) for w in (4, 8) for s in (2, 3)}
                 | set(CANDIDATES["dq"])),
}
# Taken only when every candidate runs out of shared memory: fp32 at D = 128 and 256 (the
# smallest candidates need 256 KiB of sm_90's 227 there; these take 98-196 KiB with every flag).
FALLBACK: dict[str, Config] = {"fwd": (32, 32, 4, 2), "dkdv": (16, 32, 4, 2), "dq": (32, 32, 4, 2)}
INTERPRETER_CONFIG: Config = (32, 32, 4, 1)  # small tiles: the interpreter runs them on the CPU
DECODE_MAX_Q = 16
TUNINGS: collections.Counter = collections.Counter()
SHIPPED_DIR = Path(__file__).parent / "tuned"


def fits(config: Config, block_d: int) -> bool:
    """Tiles the registers and shared memory hold at this head dim (D = 256 needs smaller ones)."""
    return max(config[0], config[1]) * block_d <= 128 * 128


def decode_config(block_d: int) -> Config:
    """Decoding shapes (Nq <= DECODE_MAX_Q): 16-query tiles, the keys in wide ones."""
    return (16, 128 if block_d <= 128 else 64, 4, 2)


def bucket(n: int) -> int:
    return 1 << max(4, math.ceil(math.log2(max(n, 1))))


def mask_kind(causal: bool, padding: bool, attn_mask: int, dropout: bool, mods: bool = False) -> str:
    """mods: a window, softcap or ALiBi, whose registers change the best tiles (they tune apart)."""
    parts = [name for name, on in (("causal", causal), ("padded", padding), ("bool-mask", attn_mask == 1),
                                   ("float-mask", attn_mask == 2), ("dropout", dropout), ("mods", mods)) if on]
    return "+".join(parts) or "dense"


def dtype_name(dtype: torch.dtype, precision: str) -> str:
    """fp16 and bf16 share configurations; fp32 tunes apart for IEEE, TF32 and 3xTF32 dots."""
    if dtype == torch.float32:
        return {"ieee": "fp32", "tf32": "fp32-tf32"}.get(precision, "fp32-3xtf32")
    return "16bit"


def make_key(kernel: str, dtype: str, block_d: int, kind: str, nq: int, nk: int) -> str:
    return f"{kernel}|{dtype}|d{block_d}|{kind}|q{bucket(nq)}|k{bucket(nk)}"


def _parse(key: str) -> tuple[str, int, int]:
    """(the key without its buckets, log2 of the Nq bucket, log2 of the Nk bucket)"""
    *head, q, k = key.split("|")
    return "|".join(head), int(q[1:]).bit_length(), int(k[1:]).bit_length()


def gpu_arch() -> str:
    major, minor = torch.cuda.get_device_capability()
    return f"sm{major}{minor}"


def cache_path() -> Path:
    import triton

    root = Path(os.environ.get("FASTATTN_CACHE_DIR", Path.home() / ".cache" / "fastattn"))
    name = torch.cuda.get_device_name().replace(" ", "-").lower()
    return root / f"triton-{name}-triton{triton.__version__}.json"


def load_checked(directory: Path, arch: str) -> dict[str, set[Config]]:
    """kernel -> the configs checked on `arch` with the installed Triton's minor version, from the
    manifest fastattn.bench.triton_checked writes on a GPU; {} where there is none."""
    import triton

    minor = lambda version: version.split(".")[:2]  # noqa: E731
    try:
        manifest = json.loads((directory / f"checked-{arch}.json").read_text())
        if minor(manifest["triton"]) != minor(triton.__version__):
            return {}
        return {kernel: {tuple(c) for c in configs} for kernel, configs in manifest["configs"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def load_configs(path: Path) -> dict[str, Config]:
    try:
        return {k: tuple(v) for k, v in json.loads(path.read_text())["configs"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


class Tuner:
    """Remembers the configuration of each key; `bench(config) -> ms` is asked only on a miss."""

    def __init__(self):
        self.chosen: dict[str, Config] = {}
        self.force: dict[str, Config] = {}  # kernel -> config: the sweep's, over everything else
        self._shipped: dict[str, Config] | None = None
        self._cache: dict[str, Config] | None = None
        self._checked: dict[str, set[Config]] | None = None

    def shipped(self) -> dict[str, Config]:
        if self._shipped is None:
            self._shipped = load_configs(SHIPPED_DIR / f"{gpu_arch()}.json")
        return self._shipped

    def checked(self) -> dict[str, set[Config]]:
        """kernel -> the configs a GPU like this one has checked, with this Triton (empty: none)."""
        if self._checked is None:
            self._checked = load_checked(SHIPPED_DIR, gpu_arch())
        return self._checked

    def cached(self) -> dict[str, Config]:
        if self._cache is None:
            self._cache = load_configs(cache_path())
        return self._cache

    def nearest_shipped(self, key: str) -> Config | None:
        head, q, k = _parse(key)
        near = [(abs(q - q2) + abs(k - k2), c) for key2, c in self.shipped().items()
                for head2, q2, k2 in [_parse(key2)] if head2 == head]
        return min(near)[1] if near else None

    def config(self, key: str, kernel: str, block_d: int, nq: int, bench) -> Config:
        if kernel in self.force:
            return self.force[kernel]
        if key in self.chosen:  # also a decode key whose rule ran out of shared memory
            return self.chosen[key]
        if nq <= DECODE_MAX_Q:
            return decode_config(block_d)
        checked = self.checked().get(kernel, set())
        tunable = [c for c in CANDIDATES[kernel] if fits(c, block_d) and c in checked]
        found = next((c for c in (self.cached().get(key), self.shipped().get(key), self.nearest_shipped(key))
                      if c in checked and fits(c, block_d)), None)
        if found is None and (os.environ.get("FASTATTN_TUNE") == "0" or not tunable):
            found = self._order(kernel, block_d)[0]
        if found is None:
            TUNINGS[key] += 1
            found = min(tunable, key=bench)
            self.cached()[key] = found
            self._save()
        self.chosen[key] = found
        return found

    def _order(self, kernel: str, block_d: int) -> list[Config]:
        """The configs a call tries in turn: the candidates that fit and a GPU has checked (every
        one that fits where none is), then the fallback, of least shared memory."""
        fitting = [c for c in CANDIDATES[kernel] if fits(c, block_d)]
        checked = [c for c in fitting if c in self.checked().get(kernel, set())]
        return list(dict.fromkeys([*(checked or fitting), FALLBACK[kernel]]))

    def next_candidate(self, key: str, kernel: str, block_d: int, failed: Config) -> Config:
        """The config after `failed`, which ran out of shared memory, remembered for the key."""
        order = self._order(kernel, block_d)
        later = order[order.index(failed) + 1:] if failed in order else order
        if not later:
            raise RuntimeError(f"no launch configuration of the {kernel} kernel fits this GPU's shared memory")
        self.chosen[key] = later[0]
        return later[0]

    def _save(self) -> None:
        path = cache_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            merged = {**load_configs(path), **self.cached()}  # keep what other processes tuned meanwhile
            with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
                f.write(json.dumps({"configs": merged}, indent=1, sort_keys=True))
            os.replace(f.name, path)  # atomic: processes tuning side by side never see half a file
        except OSError:
            pass  # a read-only home: the tuning still holds for this process


def time_ms(launch, reps: int = 5) -> float:
    """Median of a few CUDA-event timings after a first launch (which compiles). Tuning only:
    its synchronisation happens once per key, never in steady state."""
    launch()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        launch()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


TUNER = Tuner()
