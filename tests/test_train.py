"""`python -m fastattn train`: a short run end to end, checkpoints, bad input, and DDP."""
import json
import subprocess
import sys

import pytest
import torch

from fastattn.train import main

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
