"""attn_implementation="fastattn" against "eager" on a tiny random model of every transformers
family with a causal-LM, seq2seq-LM or masked-LM head (tests/transformers_sweep.py). A family
passes where fastattn agrees with eager or refuses it with its own ValueError("fastattn: ...");
a mismatch, a crash, or a model that never calls fastattn fails."""
import pytest

pytest.importorskip("transformers")

import transformers_sweep as sweep  # noqa: E402  (tests/ is on sys.path under pytest)


@pytest.fixture(scope="module", autouse=True)
def registered():
    sweep.setup()


@pytest.mark.parametrize("target", sweep.targets(), ids=lambda t: f"{t.model_type}-{t.kind}")
def test_family(target):
    outcome = sweep.check(target)
    if outcome.status == "unbuildable":
        pytest.skip(f"no tiny {target.model_type}: {outcome.detail}")
    assert outcome.status in ("pass", "refused"), f"{outcome.status}: {outcome.detail}"
