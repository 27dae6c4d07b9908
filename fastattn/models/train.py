"""`python -m fastattn train`: train the notes' Transformer on a synthetic reversal task
(encoder-decoder) or a character language model (decoder-only), on fastattn or torch attention.

With --pack the reverse task's batches run packed: each batch's tokens end to end with no
padding (fastattn.attention_varlen), on the same examples and the same model as the padded run.

Under `torchrun --nproc_per_node=N -m fastattn train ...` it runs DistributedDataParallel
(gloo on CPU, nccl on GPU): every rank draws the same global batch and trains on its slice.
With --context-parallel N (--task lm) every rank takes the whole batch instead, and its zigzag
part of every sequence (fastattn.distributed): attention runs as ring attention, and the
gradients are summed over the ranks.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..distributed import shard
from .transformer import ATTENTION, ContextShard, Packed, Transformer, TransformerLM

PAD, SOS, EOS = 0, 1, 2
SAMPLE_TEXT = (
    "The Transformer replaces recurrence with attention. Each token's query is compared with "
    "the keys of every token it may see; the softmax of those scores weighs the values, and the "
    "weighted sum is the token's new representation. The encoder builds a context from the "
    "source sentence with self-attention, masking padding so that no weight falls on it. The "
    "decoder reads the target sentence one step at a time: masked self-attention hides the "
    "future, and encoder-decoder attention takes its queries from the decoder and its keys and "
    "values from the encoder's context. A feed-forward network, two linear layers with a ReLU "
    "between them, is applied at every position, and each block is wrapped in a residual "
    "connection followed by layer normalisation. At inference the decoder starts from a start "
    "token and feeds each prediction back as the next input, until it emits the end token. "
)


class UsageError(Exception):
    """Bad input from the command line: reported in one line, exit code 2."""


class ReverseTask:
    """Reverse a random sequence of 1-32 symbols. Source and target are padded per batch, or
    with pack, packed for the model."""

    name = "reverse"

    def __init__(self, symbols: int = 16, max_len: int = 32, pack: bool = False):
        self.vocab = symbols + 3  # PAD, SOS, EOS, then the symbols
        self.max_len = max_len
        self.pack = pack

    def batch(self, size: int, gen: torch.Generator):
        lengths = torch.randint(1, self.max_len + 1, (size,), generator=gen)
        src = torch.randint(3, self.vocab, (size, self.max_len), generator=gen)
        src[torch.arange(self.max_len)[None] >= lengths[:, None]] = PAD
        tgt = torch.full((size, self.max_len + 1), PAD)
        for i, n in enumerate(lengths.tolist()):
            tgt[i, :n] = src[i, :n].flip(0)
            tgt[i, n] = EOS
        width = int(lengths.max())
        src, tgt = src[:, :width], tgt[:, :width + 1]
        tgt_in = torch.cat([torch.full((size, 1), SOS), tgt[:, :-1]], dim=1)  # teacher forcing
        return src, tgt_in, tgt

    def model(self, args) -> Transformer:
        return Transformer(self.vocab, self.vocab, args.d_model, args.heads, args.layers, args.layers,
                           4 * args.d_model, args.dropout, 2 * self.max_len, PAD, args.attention)

    def targets(self, batch) -> int:
        return int((batch[2] != PAD).sum())

    def tokens(self, batch) -> int:
        return int((batch[0] != PAD).sum()) + self.targets(batch)

    def loss_sum(self, model, batch, device):
        """Cross-entropy summed over the target tokens."""
        src, tgt_in, tgt = batch
        if self.pack:  # tgt_in packed as tgt: its fed-back EOS, whose target is padding, drops out
            src, tgt_in = Packed.from_padded(src, src == PAD), Packed.from_padded(tgt_in, tgt == PAD)
            tgt = tgt[tgt != PAD]
        src, tgt_in, tgt = (t.to(device) for t in (src, tgt_in, tgt))
        logits = model(src, tgt_in)  # (B, T, V), or (total_t, V) packed
        return F.cross_entropy(logits.flatten(0, -2), tgt.flatten(), ignore_index=PAD, reduction="sum")

    @torch.no_grad()
    def evaluate(self, model, examples, device) -> float:
        src, _, tgt = examples
        out = model.generate(src.to(device), tgt.shape[1], SOS, EOS).cpu()
        out = torch.nn.functional.pad(out, (0, tgt.shape[1] - out.shape[1]), value=PAD)
        return (out == tgt).all(dim=1).float().mean().item()

    def show(self, model, examples, device, n: int = 4) -> list[str]:
        src, _, tgt = (t[:n] for t in examples)
        out = model.generate(src.to(device), tgt.shape[1], SOS, EOS).cpu()
        text = lambda ids: " ".join(str(i - 3) for i in ids.tolist() if i > EOS)  # noqa: E731
        return [f"{text(s)}  ->  {text(o)}   (want {text(t)})" for s, o, t in zip(src, out, tgt)]


class LMTask:
    """A character language model on a text; the last tenth is held out."""

    name = "lm"

    def __init__(self, text: str, block: int = 128):
        chars = sorted(set(text))
        self.vocab_chars = "".join(chars)
        self.vocab = len(chars) + 1  # id 0 is padding
        ids = torch.tensor([chars.index(c) + 1 for c in text])
        split = int(len(ids) * 0.9)
        self.train_ids, self.held_out = ids[:split], ids[split:]
        self.block = min(block, len(self.held_out) - 2)  # room for one window and its shifted target
        if self.block < 8:
            raise UsageError(f"--data: the text is too short ({len(text)} characters); need at least 100")

    def batch(self, size: int, gen: torch.Generator, ids=None):
        ids = self.train_ids if ids is None else ids
        starts = torch.randint(0, len(ids) - self.block - 1, (size,), generator=gen)
        x = torch.stack([ids[s:s + self.block + 1] for s in starts.tolist()])
        return x[:, :-1], x[:, 1:]

    def model(self, args) -> TransformerLM:
        return TransformerLM(self.vocab, args.d_model, args.heads, args.layers, 4 * args.d_model,
                             args.dropout, self.block + self.sample, PAD, args.attention)

    def targets(self, batch) -> int:
        return batch[1].numel()

    def tokens(self, batch) -> int:
        return batch[0].numel()

    def loss_sum(self, model, batch, device):
        x, y = (t.to(device) for t in batch)
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum")

    @torch.no_grad()
    def evaluate(self, model, examples, device) -> float:
        """Next-character accuracy on held-out text (the LM's exact match)."""
        x, y = examples
        return (model(x.to(device)).argmax(-1).cpu() == y).float().mean().item()

    sample = 64  # characters generated after each shown prompt

    def show(self, model, examples, device, n: int = 2) -> list[str]:
        prompt = examples[0][:n, :32].to(device)
        out = model.generate(prompt, self.sample).cpu()
        text = lambda ids: "".join(self.vocab_chars[i - 1] for i in ids.tolist() if i > 0)  # noqa: E731
        return [f"{text(p)!r} -> {text(o[prompt.shape[1]:])!r}" for p, o in zip(prompt.cpu(), out)]


def make_task(args):
    if args.task == "reverse":
        return ReverseTask(pack=args.pack)
    path = Path(args.data) if args.data else None
    if path is not None and not path.is_file():
        raise UsageError(f"--data: no such file: {path}")
    text = path.read_text(encoding="utf-8", errors="replace") if path else SAMPLE_TEXT
    if not text.strip():
        raise UsageError(f"--data: the file is empty: {path}")
    return LMTask(text)


def task_vocab(task):
    return task.vocab_chars if isinstance(task, LMTask) else task.vocab


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m fastattn train", description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=["reverse", "lm"], default="reverse")
    p.add_argument("--data", help="text file for --task lm (default: a built-in sample)")
    p.add_argument("--attention", choices=ATTENTION, default="fastattn")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=3000, help="at most this many optimizer steps")
    p.add_argument("--target", type=float, default=0.97, help="stop once held-out exact match reaches this")
    p.add_argument("--eval-every", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64, help="global batch, split across ranks")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100, help="linear learning-rate warm-up steps")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dropout", type=float,
                   help="default 0 for reverse (endless fresh data cannot be overfitted), 0.1 for lm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", help="write a checkpoint here at the end")
    p.add_argument("--resume", help="start from this checkpoint")
    p.add_argument("--json", help="write the final metrics here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--pack", action="store_true",
                   help="run packed batches, no padding (--task reverse, fastattn attention)")
    p.add_argument("--context-parallel", type=int, default=1, metavar="W",
                   help="split every sequence over W ranks, ring attention (--task lm, fastattn attention, "
                        "--dropout 0; under torchrun with W processes; blocks rounded down to a multiple of 2W)")
    args = p.parse_args(argv)
    if args.pack and args.attention != "fastattn":
        raise UsageError("--pack: packed batches run on fastattn.attention_varlen; "
                         f"expected --attention fastattn, got {args.attention}")
    if args.context_parallel < 1:
        raise UsageError(f"--context-parallel: expected a number of ranks >= 1, got {args.context_parallel}")
    if args.context_parallel > 1 and (args.task != "lm" or args.attention != "fastattn" or args.dropout != 0):
        raise UsageError("--context-parallel: splits the sequences of --task lm, on --attention fastattn, with "
                         "--dropout 0 (ring attention has no attention dropout)")
    if args.pack and args.task != "reverse":
        raise UsageError("--pack: --task lm trains on equal-length blocks, which hold no padding to remove; "
                         "packing applies to --task reverse")
    if args.dropout is None:
        args.dropout = 0.0 if args.task == "reverse" else 0.1
    return args


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up (post-norm Transformers need one), then a cosine decay from 1 to 0.1."""
    cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0)))
    return min((step + 1) / warmup, cosine)


def load_checkpoint(path, task, model, opt, device) -> int:
    if not Path(path).is_file():
        raise UsageError(f"--resume: no such file: {path}")
    ckpt = torch.load(path, map_location=device, weights_only=False)
    if ckpt["task"] != task.name or ckpt["vocab"] != task_vocab(task):
        raise UsageError(f"--resume: vocabulary mismatch: the checkpoint was trained on task "
                         f"{ckpt['task']!r} with vocabulary {ckpt['vocab']!r}, this run has task "
                         f"{task.name!r} with vocabulary {task_vocab(task)!r}")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UsageError(f"--resume: the checkpoint's model does not fit these options: {e}") from None
    opt.load_state_dict(ckpt["optimizer"])
    return ckpt["step"]


def peak_memory_per_rank_mb(device, distributed: bool) -> list[float]:
    """Each rank's peak memory: allocated on a GPU, the process's resident set on a CPU."""
    if device.type == "cuda":
        mine = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        import resource

        mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    if not distributed:
        return [mine]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return every


def train(args) -> dict:
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    context_parallel = args.context_parallel > 1
    if context_parallel and world != args.context_parallel:
        raise UsageError(f"--context-parallel: expected torchrun's {args.context_parallel} processes, got {world}")
    data_ranks = 1 if context_parallel else world  # context parallel: every rank takes the whole batch
    if args.batch_size % data_ranks:
        raise UsageError(f"--batch-size: expected a multiple of the {world} ranks, got {args.batch_size}")
    if distributed and args.device.startswith("cuda"):
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    device = torch.device(args.device)

    torch.manual_seed(args.seed)
    task = make_task(args)
    if context_parallel:  # blocks of 2W equal chunks (zigzag)
        task.block -= task.block % (2 * world)
    model = task.model(args).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    step = load_checkpoint(args.resume, task, model, opt, device) if args.resume else 0
    net = torch.nn.parallel.DistributedDataParallel(model) if distributed and not context_parallel else model
    gen = torch.Generator().manual_seed(args.seed + step)  # the same global batches on every rank
    held_out = task.batch(500, torch.Generator().manual_seed(10**6)) if isinstance(task, ReverseTask) \
        else task.batch(64, torch.Generator().manual_seed(10**6), task.held_out)
    mine = slice(rank * args.batch_size // data_ranks, (rank + 1) * args.batch_size // data_ranks)

    from tqdm import tqdm

    bar = tqdm(total=args.steps, initial=step, disable=args.quiet or rank != 0,
               desc=f"{task.name}/{args.attention}", mininterval=1.0)
    start, tokens, score, losses = time.perf_counter(), 0, 0.0, []
    while step < args.steps:
        model.train()
        batch = task.batch(args.batch_size, gen)
        local = [t[mine] for t in batch] if not context_parallel else \
            [ContextShard.of(batch[0], PAD), shard(batch[1], 1)]  # (x, y): this rank's positions
        # Sum over this rank's tokens, divided by the global count: summed over the ranks (DDP's
        # mean times the ranks, or an all-reduce of the gradients), exactly the whole batch's.
        loss = task.loss_sum(net, local, device) / task.targets(batch)
        opt.zero_grad(set_to_none=True)
        if context_parallel:
            loss.backward()
            for p in model.parameters():
                dist.all_reduce(p.grad)
        else:
            (loss * data_ranks).backward()
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_factor(step, args.warmup, args.steps)
        opt.step()
        step += 1
        tokens += task.tokens(batch)
        loss = loss.detach()
        if distributed:
            dist.all_reduce(loss)  # the whole batch's mean loss, for the progress bar
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            score = task.evaluate(model, held_out, device)
            bar.set_postfix(loss=f"{loss.item():.3f}", exact_match=f"{score:.3f}")
            if args.quiet and rank == 0:
                print(f"step {step}: loss {loss.item():.3f}, held-out exact match {score:.3f}", flush=True)
            if score >= args.target:
                break
    bar.close()
    seconds = time.perf_counter() - start
    metrics = dict(task=task.name, attention=args.attention, pack=args.pack, device=str(device),
                   world_size=world, context_parallel=args.context_parallel, steps=step, exact_match=score,
                   seconds=seconds, tokens_per_s=tokens / seconds, losses=losses,
                   peak_memory_mb=peak_memory_per_rank_mb(device, distributed))
    if rank == 0:
        model.eval()
        for line in task.show(model, held_out, device):
            print(line)
        print(json.dumps(metrics))
        if args.save:
            torch.save(dict(task=task.name, vocab=task_vocab(task), config=asdict(model.config),
                            model=model.state_dict(), optimizer=opt.state_dict(), step=step), args.save)
        if args.json:
            Path(args.json).write_text(json.dumps(metrics, indent=2))
    if distributed:
        # DDP's reducer holds the process group: released while every rank still has it (gloo's
        # destructor, run later by the reducer alone, was seen to hang on a rank)
        del net
        dist.barrier()
        dist.destroy_process_group()
    return metrics


def main(argv=None) -> None:
    try:
        train(parse_args(argv))
    except UsageError as e:
        print(f"python -m fastattn train: error: {e}", file=sys.stderr)
        sys.exit(2)
