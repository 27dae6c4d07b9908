"""Launch-configuration lookup (fastattn.triton.tuning), without a GPU: the benchmark is faked."""
import json

import pytest
import torch

import fastattn
from fastattn.triton import tuning


def write_manifest(directory, configs=None, triton_version=None):
    """A checked-config manifest for sm90: by default every candidate and fallback, this Triton."""
    import triton

    configs = configs or {k: [*tuning.CANDIDATES[k], tuning.FALLBACK[k]] for k in tuning.CANDIDATES}
    directory.mkdir(exist_ok=True)
    (directory / "checked-sm90.json").write_text(json.dumps(
        {"triton": triton_version or triton.__version__, "configs": {k: [list(c) for c in v] for k, v in configs.items()}}))


@pytest.fixture
def tuner(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "cache_path", lambda: tmp_path / "cache.json")
    monkeypatch.setattr(tuning, "gpu_arch", lambda: "sm90")
    monkeypatch.setattr(tuning, "SHIPPED_DIR", tmp_path / "shipped")
    monkeypatch.delenv("FASTATTN_TUNE", raising=False)
    write_manifest(tmp_path / "shipped")
    return tuning.Tuner()


def lookups(tuner, lengths, kernel="fwd"):
    """Tunings run while calls of these (Nq, Nk) look their configuration up."""
    before = sum(tuning.TUNINGS.values())
    for nq, nk in lengths:
        key = tuning.make_key(kernel, "16bit", 64, "causal+padded", nq, nk)
        tuner.config(key, kernel, 64, nq, bench=lambda c: c[0] * 1000 + c[1])
    return sum(tuning.TUNINGS.values()) - before


def test_training_on_varying_lengths_tunes_once_per_bucket(tuner):
    lengths = [(n, n) for n in range(17, 1025)]
    assert lookups(tuner, lengths) == 6  # buckets 32, 64, ..., 1024
    assert lookups(tuning.Tuner(), lengths) == 0  # a new process reads the cache


def test_decoding_takes_a_rule(tuner):
    assert lookups(tuner, [(1, n) for n in range(1, 300)] + [(16, 300)]) == 0


def test_a_decode_config_out_of_shared_memory_is_not_retried(tuner):
    key = tuning.make_key("fwd", "fp32", 128, "dense", 1, 4000)
    rule = tuner.config(key, "fwd", 128, 1, bench=None)
    assert rule == tuning.decode_config(128)
    fallback = tuner.next_candidate(key, "fwd", 128, rule)
    assert tuner.config(key, "fwd", 128, 1, bench=None) == fallback != rule


def test_shipped_defaults_mean_no_tuning(tuner, tmp_path):
    shipped = {tuning.make_key("fwd", "16bit", 64, "causal+padded", 4096, 4096): [128, 128, 8, 2]}
    (tmp_path / "shipped" / "sm90.json").write_text(json.dumps({"configs": shipped}))
    assert lookups(tuner, [(4096, 4096), (1000, 1000), (9000, 9000)]) == 0  # exact, then nearest
    key = tuning.make_key("fwd", "16bit", 64, "causal+padded", 1000, 1000)
    assert tuner.config(key, "fwd", 64, 1000, bench=None) == (128, 128, 8, 2)
    assert lookups(tuner, [(4096, 4096)], kernel="dq") == 1  # no default for that kernel


def test_score_mods_tune_apart(tuner, tmp_path):
    """A window, softcap or ALiBi change the kernels' registers: never the plain kind's default."""
    from fastattn.triton.attention import Flags, _tuning_key
    plain = Flags(64, True, 0, False, True, False, "tf32", False, False, False, False, False, 64)
    keys = {_tuning_key("dkdv", plain._replace(**mods), 4096, 4096, torch.bfloat16)
            for mods in ({}, {"HAS_SINKS": True, "BOTTOM_RIGHT": True}, {"WINDOW": True}, {"SOFTCAP": True},
                         {"HAS_ALIBI": True})}
    assert keys == {tuning.make_key("dkdv", "16bit", 64, kind, 4096, 4096) for kind in ("causal+padded",
                                                                                      "causal+padded+mods")}
    shipped = {tuning.make_key("dkdv", "16bit", 64, "causal+padded", 4096, 4096): [64, 64, 4, 2]}
    (tmp_path / "shipped" / "sm90.json").write_text(json.dumps({"configs": shipped}))
    key = tuning.make_key("dkdv", "16bit", 64, "causal+padded+mods", 4096, 4096)
    assert tuner.config(key, "dkdv", 64, 4096, bench=lambda c: -c[2]) == (32, 64, 8, 2)  # tuned, not shipped


def test_tuning_off_takes_the_first_candidate_that_fits(tuner, monkeypatch):
    monkeypatch.setenv("FASTATTN_TUNE", "0")
    assert lookups(tuner, [(500, 500)]) == 0
    key = tuning.make_key("dkdv", "16bit", 256, "dense", 500, 500)
    config = tuner.config(key, "dkdv", 256, 500, bench=None)
    assert config == next(c for c in tuning.CANDIDATES["dkdv"] if tuning.fits(c, 256))


def test_key_ranges_computed_once_and_no_host_reads(monkeypatch):
    """Forward and backward derive the padding mask's kernel form once, with no host read of a
    tensor (on a GPU each would wait for the device: test_gpu checks that with sync debug)."""
    from helpers import padding_mask, qkv

    calls = []
    real = fastattn.front_door.key_ranges
    monkeypatch.setattr(fastattn.front_door, "key_ranges", lambda m: calls.append(1) or real(m))
    q, k, v = qkv(2, 4, 2, 50, 70, 32)
    kpm = padding_mask("random", 2, 70)
    for name in ("item", "tolist", "__bool__"):
        def refuse(*args, name=name):
            raise AssertionError(f"Tensor.{name} in the hot path")
        monkeypatch.setattr(torch.Tensor, name, refuse)
    fastattn.attention(q, k, v, key_padding_mask=kpm, causal=True, backend="cpu").sum().backward()
    assert len(calls) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's sweep; a GPU runs the real one")
def test_sweep_runs_end_to_end(tmp_path, monkeypatch):
    """python -m fastattn tune, through the interpreter on tiny shapes: winners checked and written."""
    from fastattn.bench.triton_sweep import main

    monkeypatch.setenv("FASTATTN_TUNE", "0")  # main sets it; the monkeypatch restores it after
    assert main(["--json", str(tmp_path / "tuned.json")]) == 0
    record = json.loads((tmp_path / "tuned.json").read_text())
    assert len(record["configs"]) == 6 and all(e <= 1 for e in record["checks"].values())


def test_a_config_out_of_shared_memory_falls_back_to_the_next(tuner):
    """fp32 at D = 128: dQ's first candidate needs 288 KiB, over sm_90's 227 (seen on an H200)."""
    key = tuning.make_key("dq", "fp32", 128, "dense", 500, 500)
    first = tuner.config(key, "dq", 128, 500, bench=lambda c: c[3])
    second = tuner.next_candidate(key, "dq", 128, first)
    assert second != first and tuner.config(key, "dq", 128, 500, bench=None) == second
    assert tuner.next_candidate(key, "dq", 128, tuning.CANDIDATES["dq"][-1]) == tuning.FALLBACK["dq"]
    with pytest.raises(RuntimeError, match="shared memory"):
        tuner.next_candidate(key, "dq", 128, tuning.FALLBACK["dq"])


def test_tuning_and_shipped_defaults_take_only_checked_configs(tuner, tmp_path):
    """dK/dV at (32, 64, 8 warps) never ran on a GPU: tuning never picks it, however fast it looks,
    and a shipped or cached default a GPU has not checked gives way to a checked candidate."""
    unchecked = (32, 64, 8, 2)
    checked = {k: [c for c in tuning.CANDIDATES[k] if c != unchecked] for k in tuning.CANDIDATES}
    write_manifest(tmp_path / "shipped", checked)
    key = tuning.make_key("dkdv", "16bit", 64, "causal+padded+mods", 4096, 4096)
    assert tuning.Tuner().config(key, "dkdv", 64, 4096, bench=lambda c: -(c == unchecked)) != unchecked
    other = tuning.make_key("dkdv", "16bit", 64, "causal", 4096, 4096)
    (tmp_path / "shipped" / "sm90.json").write_text(json.dumps({"configs": {other: list(unchecked)}}))
    assert tuning.Tuner().config(other, "dkdv", 64, 4096, bench=lambda c: c[0]) == (16, 64, 4, 2)


@pytest.mark.parametrize("manifest", ["none", "older triton"])
def test_without_a_checked_manifest_the_first_candidate_runs_untimed(tmp_path, monkeypatch, manifest):
    monkeypatch.setattr(tuning, "cache_path", lambda: tmp_path / "cache.json")
    monkeypatch.setattr(tuning, "gpu_arch", lambda: "sm90")
    monkeypatch.setattr(tuning, "SHIPPED_DIR", tmp_path / "shipped")
    monkeypatch.delenv("FASTATTN_TUNE", raising=False)
    if manifest == "older triton":
        write_manifest(tmp_path / "shipped", triton_version="2.0.0")
    tuner = tuning.Tuner()
    key = tuning.make_key("fwd", "16bit", 64, "causal", 4096, 4096)
    assert tuner.config(key, "fwd", 64, 4096, bench=None) == tuning.CANDIDATES["fwd"][0]
    assert not tuning.TUNINGS[key]


def test_a_checked_shipped_default_runs_untuned_though_no_candidate(tuner, tmp_path):
    """The shipped defaults hold configs from the sweep's wider space: checked, they run as they
    are (no tuning), and one out of shared memory walks the checked candidates, then the fallback."""
    shipped_only = (128, 64, 4, 3)
    assert shipped_only not in tuning.CANDIDATES["fwd"]
    key = tuning.make_key("fwd", "16bit", 64, "causal", 4096, 4096)
    write_manifest(tmp_path / "shipped", {k: [*tuning.CANDIDATES[k], shipped_only] for k in tuning.CANDIDATES})
    (tmp_path / "shipped" / "sm90.json").write_text(json.dumps({"configs": {key: list(shipped_only)}}))
    fresh = tuning.Tuner()
    assert fresh.config(key, "fwd", 64, 4096, bench=None) == shipped_only and not tuning.TUNINGS[key]
    assert fresh.next_candidate(key, "fwd", 64, shipped_only) == tuning.CANDIDATES["fwd"][0]


def test_out_of_shared_memory_walks_only_checked_candidates(tuner, tmp_path):
    unchecked = (32, 64, 8, 2)
    write_manifest(tmp_path / "shipped", {k: [c for c in tuning.CANDIDATES[k] if c != unchecked]
                                          for k in tuning.CANDIDATES})
    fresh, key = tuning.Tuner(), tuning.make_key("dkdv", "fp32", 128, "dense", 500, 500)
    walked, config = [], (64, 64, 4, 2)
    while config != tuning.FALLBACK["dkdv"]:
        config = fresh.next_candidate(key, "dkdv", 128, config)
        walked.append(config)
    assert unchecked not in walked and walked[-1] == tuning.FALLBACK["dkdv"]


def test_the_shipped_manifest_is_for_the_shipped_defaults():
    """checked-sm90.json names every shipped sm90 default, and its Triton is the GPU image's."""
    manifest = json.loads((tuning.SHIPPED_DIR / "checked-sm90.json").read_text())
    assert manifest["triton"].startswith("3.6.")
    checked = {k: {tuple(c) for c in v} for k, v in manifest["configs"].items()}
    for key, config in tuning.load_configs(tuning.SHIPPED_DIR / "sm90.json").items():
        assert tuple(config) in checked[key.split("|")[0]], key
    assert (32, 64, 8, 2) not in checked["dkdv"]  # never run on a GPU
    assert tuning.load_checked(tuning.SHIPPED_DIR, "sm90") in ({}, checked)  # {} on a Triton other than 3.6


def test_the_gpu_check_of_a_config_measures_against_float64(monkeypatch):
    """fastattn.bench.triton_checked, as a GPU runs it, here through the interpreter: a config's
    forward and gradients within their bound, and a wrong output caught."""
    from fastattn.backends import REGISTRY
    from fastattn.bench import triton_checked as checked

    if "triton" not in fastattn.available_backends():
        pytest.skip("triton backend unavailable")
    items = checked.items("sm90")
    for kernel in ("fwd", "dkdv", "dq"):
        configs = {c for k, c, _, _ in items if k == kernel}
        assert set(tuning.CANDIDATES[kernel]) | {tuning.FALLBACK[kernel]} <= configs
    assert checked.check("fwd", (64, 32, 4, 2), 16, "float32", "cpu", (70, 90)) < 1
    backend = REGISTRY["triton"]
    real = type(backend).forward
    monkeypatch.setattr(type(backend), "forward", lambda self, *a: (lambda o, l: (o * 1.001, l))(*real(self, *a)))
    assert checked.check("fwd", (64, 32, 4, 2), 16, "float32", "cpu", (70, 90)) > 1
