"""The record's report: the environment it ran in, the console tables, the README's markdown
table and the TFLOPS charts."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch


def percent(row: dict) -> str:
    return f"{row['pct_of_peak']:.0f}%" if row.get("pct_of_peak") is not None else ""


def environment(device: str) -> dict:
    def commit():
        try:
            return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                  cwd=Path(__file__).parent).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return os.environ.get("FASTATTN_COMMIT", "unknown")

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return dict(device=name, commit=os.environ.get("FASTATTN_COMMIT") or commit(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, triton=triton_version, python=platform.python_version())


def markdown_table(record: dict) -> str:
    """The README's GPU table: a line per case, TFLOPS per provider, fastattn's ratio to the best
    peer. Regenerate with `python -m fastattn bench --table RECORD.json`."""
    cases = {}
    for r in record["rows"]:
        cases.setdefault(r["case"], {})[r["backend"]] = r
    names = sorted({r["backend"] for r in record["rows"] if r.get("tflops") and r["backend"] != "sdpa:math"},
                   key=lambda n: (not n.startswith("fastattn"), n))
    lines = [f"| case | {' | '.join(names)} | best peer | {' | '.join(n + ' ÷ best' for n in names if n.startswith('fastattn'))} |",
             "|---" * (2 + len(names) + sum(n.startswith("fastattn") for n in names)) + "|"]
    for case, rows in cases.items():
        cells = [f"{rows[n]['tflops']:.0f}" if "tflops" in rows.get(n, {}) else "—" for n in names]
        any_row = next(iter(rows.values()))
        ratios = [f"{rows[n]['speedup_vs_best_peer']:.2f}×" if rows.get(n, {}).get("speedup_vs_best_peer") else "—"
                  for n in names if n.startswith("fastattn")]
        lines.append(f"| {case} | {' | '.join(cells)} | {any_row['best_peer']} | {' | '.join(ratios)} |")
    return "\n".join(lines)


def print_tables(record: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 150))
    p = record["peaks"]
    rates = ", ".join(f"{dtype} {tflops:.2f}" for dtype, tflops in p["tflops"].items())
    console.print(f"[bold]fastattn bench[/] on {record['device']}, torch {record['torch']}, triton "
                  f"{record['triton']}; measured peaks ({p['source']}): {rates} TFLOPS, copy {p['copy_gbps']:.0f} GB/s")
    table = Table(title="attention (TFLOPS count valid tokens only: padded queries and keys excluded)")
    for col in ("case", "provider", "ms", "TFLOPS", "% peak", "vs best peer", "best peer", "max err", "peak MB"):
        table.add_column(col, justify="left" if col in ("case", "provider", "best peer") else "right")
    last = None
    for r in record["rows"]:
        if last is not None and r["case"] != last:
            table.add_section()
        last = r["case"]
        if "error" in r:
            table.add_row(r["case"], r["backend"], "—", "", "", "", "", "", "", style="dim")
            continue
        fa = r["backend"].startswith("fastattn")
        speed = f"{r['speedup_vs_best_peer']:.2f}×" if r["speedup_vs_best_peer"] and fa else ""
        mem = f"{max(r['peak_mem_mb'], 0):.0f}" if r.get("peak_mem_mb") is not None else ""
        tflops = f"{r['tflops']:.1f}" if r["tflops"] >= 10 else f"{r['tflops']:.3f}"
        table.add_row(r["case"], r["backend"], f"{r['ms']:.3f}", tflops, percent(r),
                      speed, r["best_peer"] if fa else "", f"{r['max_err']:.1e}", mem, style="bold" if fa else None)
    console.print(table)
    failed = [r for r in record["rows"] if "error" in r]
    if failed:
        console.print(f"{len(failed)} provider/case pairs did not run, e.g. {failed[0]['backend']} on "
                      f"{failed[0]['case']}: {failed[0]['error']}")
    if record.get("isa"):
        table = Table(title=f"the CPU kernel per ISA table against SDPA at the same ISA level (this CPU runs "
                            f"{record['isa'][0]['isa']} by default; FASTATTN_CPU_ISA picks another)")
        for col in ("ISA", "torch level", "case", "fastattn ms", "SDPA ms", "fastattn ÷ SDPA",
                    "bf16 ÷ via fp32", "fp32 GEMM GFLOPS", "% of FMA peak"):
            table.add_column(col)
        for r in record["isa"]:
            vs_fp32 = f"{r['ratio_vs_fp32']:.2f}×" if "ratio_vs_fp32" in r else ""
            sdpa = (f"{r['sdpa_ms']:.1f}", f"{r['ratio']:.2f}×") if "sdpa_ms" in r else ("failed", "")
            table.add_row(r["isa"], r["torch_level"], r["case"], f"{r['fastattn_ms']:.1f}", *sdpa, vs_fp32, f"{r['gemm_gflops']:.0f}",
                          f"{100 * r['gemm_gflops'] / r['fma_peak_gflops']:.0f}%")
        console.print(table)
    print_calls(record, console)
    print_decode_and_packed(record, console)
    if record.get("modules"):
        table = Table(title="nn.MultiheadAttention end to end (eval, need_weights=False, self-attention)")
        for col in ("case", "module", "ms", "speedup"):
            table.add_column(col)
        for r in record["modules"]:
            if "ms" not in r:
                table.add_row(r["case"], r["backend"], "—", r.get("error", ""), style="dim")
                continue
            speed = f"{r['speedup_vs_best_peer']:.2f}×" if r["speedup_vs_best_peer"] else ""
            table.add_row(r["case"], r["backend"], f"{r['ms']:.2f}", speed)
        console.print(table)
    if record.get("end_to_end"):
        table = Table(title="Whole models. nn.TransformerEncoder: d_model 512, 8 heads, 6 layers, batch 8, "
                            "sequence 512 (padded: lengths uniform in [128, 512]). fastattn.models.Transformer: "
                            "2 + 2 layers, 8 pairs of lengths uniform in [32, 256]. Tokens/s count real tokens")
        for col in ("batch", "model", "inference ms", "train step ms", "train tokens/s"):
            table.add_column(col)
        for r in record["end_to_end"]:
            infer = f"{r['infer_ms']:.0f}" if "infer_ms" in r else ""
            table.add_row(r["batch"], r["model"], infer, f"{r['train_ms']:.0f}", f"{r['train_tokens_per_s']:.0f}")
        console.print(table)


def print_calls(record: dict, console) -> None:
    from rich.table import Table

    if not record.get("calls"):
        return
    gpu = any("host_us" in r for r in record["calls"])
    table = Table(title="small calls: µs per call, back to back, best round (fastattn ÷ peer: lower is better)"
                  + ("; host: the profiler's CPU time in the op; graph: replayed from a CUDA graph" if gpu else ""))
    cols = ["case", "fastattn µs", "peer", "peer µs", "fastattn ÷ peer"]
    cols += ["host µs (fastattn / peer)", "graph µs (fastattn / peer)"] if gpu else []
    for col in cols:
        table.add_column(col, justify="left" if col in ("case", "peer") else "right")
    for r in record["calls"]:
        if "us" not in r:
            table.add_row(r["case"], "—", r["best_peer"], "", r.get("error", ""), style="dim")
            continue
        extra = []
        if gpu:
            extra = [f"{r.get('host_us', float('nan')):.1f} / {r.get('peer_host_us', float('nan')):.1f}",
                     f"{r.get('graph_us', float('nan')):.1f} / {r.get('peer_graph_us', float('nan')):.1f}"]
        table.add_row(r["case"], f"{r['us']:.1f}", r["best_peer"], f"{r['peer_us']:.1f}", f"{r['ratio']:.2f}×", *extra)
    console.print(table)


def print_decode_and_packed(record: dict, console) -> None:
    from rich.table import Table

    for key, title, extra in (
            ("decode", "decoding: one new query per row against a KV cache, per step", ("GB/s", "gb_per_s")),
            ("varlen", "packed (varlen) batch against the same batch padded (TFLOPS: valid tokens)",
             ("TFLOPS", "tflops")),
            ("score_mods", "sliding windows, softcap and sinks (TFLOPS: the pairs each query sees)",
             ("TFLOPS", "tflops")),
            ("context_parallel", "context parallelism: ring attention over processes against one", ("TFLOPS", "tflops"))):
        if not record.get(key):
            continue
        table = Table(title=title)
        peaked = key != "decode"
        cols = ["case", "provider", "ms", extra[0], *(["% peak"] if peaked else []), "vs best peer"]
        for col in cols:
            table.add_column(col, justify="left" if col in ("case", "provider") else "right")
        last = None
        for r in record[key]:
            if last is not None and r["case"] != last:
                table.add_section()
            last = r["case"]
            if "ms" not in r:
                table.add_row(r["case"], r["backend"], "—", "", *([""] if peaked else []),
                              r.get("error", ""), style="dim")
                continue
            speed = f"{r['speedup_vs_best_peer']:.2f}× {r['best_peer']}" if r["speedup_vs_best_peer"] else ""
            table.add_row(r["case"], r["backend"], f"{r['ms']:.3f}", f"{r[extra[1]]:.2f}",
                          *([percent(r)] if peaked else []), speed,
                          style="bold" if r["backend"].startswith("fastattn") else None)
        console.print(table)
        for r in record[key]:
            if "comm_ms" in r:  # ring rows: their transfers timed alone, and the time the ranks waited on them
                console.print(f"{r['case']}: the ring's transfers take {r['comm_ms']:.1f} ms alone; the ranks waited "
                              f"{r['exposed_comm_ms']:.1f} ms on them ({r['hidden_comm_share']:.0%} hidden)")


def plot(record: dict, path: str) -> None:
    """One PNG: a row of charts per (mode, dtype, D), a column per case kind. TFLOPS against N,
    a line per provider; bars per provider where the group has a single N. A provider keeps its
    colour across charts, and one legend serves them all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {}
    for r in record["rows"]:
        if "tflops" in r:
            lines = groups.setdefault((r["mode"], r["dtype"], r["head_dim"]), {}).setdefault(r["kind"], {})
            lines.setdefault(r["backend"], []).append((r["seq"], r["tflops"]))
    if not groups:
        return
    kinds = sorted({kind for charts in groups.values() for kind in charts})
    names = sorted({name for charts in groups.values() for lines in charts.values() for name in lines})
    cmap = plt.get_cmap("tab20")
    colour = {name: cmap(i % 20) for i, name in enumerate(names)}
    fig, axes = plt.subplots(len(groups), len(kinds), figsize=(4.5 * len(kinds), 3.6 * len(groups)), squeeze=False)
    for row, ((mode, dtype, D), charts) in zip(axes, sorted(groups.items())):
        for ax, kind in zip(row, kinds):
            lines = charts.get(kind)
            if not lines:
                ax.axis("off")
                continue
            seqs = sorted({n for points in lines.values() for n, _ in points})
            for i, (name, points) in enumerate(sorted(lines.items())):
                if len(seqs) > 1:
                    n, t = zip(*sorted(points))
                    ax.plot(n, t, marker="o", color=colour[name], linewidth=2.5 if name.startswith("fastattn") else 1)
                else:
                    ax.barh(i, points[0][1], color=colour[name])
            if len(seqs) > 1:
                ax.set_xscale("log", base=2)
                ax.set(xlabel="sequence length N", ylabel="TFLOPS (valid tokens)")
            else:
                ax.set_yticks(range(len(lines)), sorted(lines), fontsize=7)
                ax.set(xlabel=f"TFLOPS (valid tokens), N={seqs[0]}")
            ax.set_title(f"{kind}, {mode} {dtype} D={D}", fontsize=9)
    handles = [plt.Line2D([], [], color=colour[n], linewidth=2.5 if n.startswith("fastattn") else 1) for n in names]
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 6), fontsize=8)
    fig.suptitle(record["device"])
    fig.tight_layout(rect=(0, 0.6 / fig.get_figheight(), 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
