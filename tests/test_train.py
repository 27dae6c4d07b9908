"""`python -m fastattn train`: a short run end to end, checkpoints, bad input, DDP, and packed
batches (--pack): the padded loss and gradients, and a model that learns the task."""
import json
import subprocess
import sys

import pytest
import torch

from fastattn.models.train import PAD, ReverseTask, main, parse_args

FAST = ["--quiet", "--steps", "6", "--eval-every", "3", "--batch-size", "8", "--d-model", "32",
        "--heads", "2", "--layers", "1"]


def run(*args):
    main([*FAST, *args])


def test_reverse_run_writes_metrics_and_checkpoint(tmp_path, capsys):
    run("--json", str(tmp_path / "m.json"), "--save", str(tmp_path / "c.pt"))
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert {"exact_match", "seconds", "tokens_per_s", "attention"} <= metrics.keys()
    assert metrics["attention"] == "fastattn" and metrics["steps"] == 6
    assert "->" in capsys.readouterr().out  # greedy decodes printed
    ckpt = torch.load(tmp_path / "c.pt", weights_only=False)
    assert ckpt["step"] == 6 and ckpt["task"] == "reverse"
    run("--resume", str(tmp_path / "c.pt"), "--steps", "8", "--json", str(tmp_path / "r.json"))
    assert json.loads((tmp_path / "r.json").read_text())["steps"] == 8


def test_pack_run_and_checkpoints_move_between_packed_and_padded(tmp_path):
    run("--pack", "--json", str(tmp_path / "m.json"), "--save", str(tmp_path / "c.pt"))
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["pack"] is True and metrics["steps"] == 6 and metrics["tokens_per_s"] > 0
    run("--resume", str(tmp_path / "c.pt"), "--steps", "8", "--save", str(tmp_path / "r.pt"),
        "--json", str(tmp_path / "r.json"))
    assert json.loads((tmp_path / "r.json").read_text())["pack"] is False
    run("--pack", "--resume", str(tmp_path / "r.pt"), "--steps", "10", "--json", str(tmp_path / "p.json"))
    assert json.loads((tmp_path / "p.json").read_text())["steps"] == 10


def test_packed_loss_and_gradients_equal_padded():
    """The same examples through the training loss, padded and packed (no padding, and the
    decoder input's fed-back EOS left out): equal loss and gradients."""
    torch.manual_seed(0)
    model = ReverseTask().model(parse_args(["--d-model", "32", "--heads", "2", "--layers", "2"]))
    batch = ReverseTask().batch(8, torch.Generator().manual_seed(1))
    assert (batch[0] == PAD).any() and (batch[1] == PAD).any()
    losses, grads = [], []
    for pack in (False, True):
        model.zero_grad()
        loss = ReverseTask(pack=pack).loss_sum(model, batch, "cpu") / ReverseTask().targets(batch)
        loss.backward()
        losses.append(loss)
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_packed_training_learns_the_task():
    """100 Adam steps on packed batches of a smaller reversal (4 symbols, 1-6 long) take held-out
    exact match from chance (about 0.05) past 0.4."""
    torch.manual_seed(0)
    task = ReverseTask(symbols=4, max_len=6, pack=True)
    model = task.model(parse_args(["--d-model", "32", "--heads", "2", "--layers", "1"]))
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(100):
        batch = task.batch(32, gen)
        loss = task.loss_sum(model, batch, "cpu") / task.targets(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    model.eval()
    assert task.evaluate(model, task.batch(200, torch.Generator().manual_seed(99)), "cpu") > 0.4


def test_lm_on_a_file_with_torch_attention(tmp_path):
    data = tmp_path / "text.txt"
    data.write_text("attention is all you need. " * 20)
    run("--task", "lm", "--data", str(data), "--attention", "torch", "--json", str(tmp_path / "m.json"))
    assert json.loads((tmp_path / "m.json").read_text())["attention"] == "torch"


@pytest.mark.parametrize("args, words", [
    (["--task", "translate"], ["--task", "translate"]),
    (["--task", "lm", "--data", "/no/such/file.txt"], ["--data", "no such file"]),
    (["--task", "lm", "--data", "EMPTY"], ["--data", "empty"]),
    (["--resume", "/no/such.pt"], ["--resume", "no such file"]),
    (["--batch-size", "8", "--resume", "LM_CKPT"], ["vocabulary mismatch", "'lm'", "'reverse'"]),
    (["--pack", "--attention", "torch"], ["--pack", "--attention fastattn"]),
    (["--pack", "--task", "lm"], ["--pack", "--task lm", "equal-length"]),
    (["--context-parallel", "2"], ["--context-parallel", "--task lm", "--dropout 0"]),
    (["--context-parallel", "0"], ["--context-parallel", ">= 1", "got 0"]),
    (["--context-parallel", "2", "--task", "lm", "--dropout", "0"], ["torchrun's 2 processes, got 1"]),
])
def test_bad_input_exits_2_with_a_message(args, words, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    if "LM_CKPT" in args:
        data = tmp_path / "t.txt"
        data.write_text("some text for a tiny language model. " * 10)
        run("--task", "lm", "--data", str(data), "--save", str(tmp_path / "lm.pt"))
    args = [str(tmp_path / "lm.pt") if a == "LM_CKPT" else str(empty) if a == "EMPTY" else a for a in args]
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run(*args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert "Traceback" not in err


def test_ddp_two_processes_equal_one_process(tmp_path):
    """torchrun with 2 CPU ranks (gloo) gives the parameters of one process on the same global batch."""
    args = [*FAST, "--dropout", "0", "--steps", "4", "--eval-every", "100"]
    main([*args, "--save", str(tmp_path / "one.pt")])
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "-m", "fastattn", "train", *args, "--save", str(tmp_path / "two.pt")],
                   check=True, timeout=300)
    one = torch.load(tmp_path / "one.pt", weights_only=False)["model"]
    two = torch.load(tmp_path / "two.pt", weights_only=False)["model"]
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=1e-4, msg=name)
    start = torch.load(tmp_path / "one.pt", weights_only=False)
    assert start["step"] == 4


def test_context_parallel_two_processes_equal_one_process(tmp_path):
    """torchrun with 2 CPU ranks, every LM sequence split across them (ring attention): the loss
    curve of one process over 20 steps, and each rank's peak memory recorded."""
    data = tmp_path / "text.txt"
    data.write_text("the quick brown fox jumps over the lazy dog while the cat sleeps by the warm fire. " * 60)
    args = ["--quiet", "--steps", "20", "--eval-every", "100", "--batch-size", "4", "--d-model", "32", "--heads", "2",
            "--layers", "2", "--task", "lm", "--dropout", "0", "--data", str(data)]
    main([*args, "--json", str(tmp_path / "one.json")])
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "-m", "fastattn", "train", *args, "--context-parallel", "2", "--json", str(tmp_path / "two.json")],
                   check=True, timeout=300)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["context_parallel"] == 2 and len(two["peak_memory_mb"]) == 2 and two["tokens_per_s"] > 0
    assert len(one["losses"]) == len(two["losses"]) == 20
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), atol=1e-5, rtol=1e-5)
