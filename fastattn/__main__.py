"""python -m fastattn {info, bench, train, tune, report}."""
from __future__ import annotations

import argparse
import platform

import torch


def info() -> None:
    import fastattn
    from fastattn.backends import available_backends, unavailable_backends

    print(f"fastattn {fastattn.__version__}")
    print(f"python   {platform.python_version()}")
    print(f"torch    {torch.__version__} (CUDA {torch.version.cuda or 'none'}), "
          f"{torch.get_num_threads()} CPU threads")
    try:
        import triton

        print(f"triton   {triton.__version__}")
    except ImportError:
        print("triton   not installed")
    if "cpu" in available_backends():
        from fastattn import _C

        print(f"cpu ISA  {_C.cpu_isa()} (this CPU runs: {', '.join(_C.cpu_isas())})")
    print("backends available (priority order): " + ", ".join(available_backends()))
    for name, why in unavailable_backends().items():
        print(f"  {name} unavailable: {why}")
    dispatch_tables(["cpu"] + (["cuda"] if torch.cuda.is_available() else []))


def dispatch_tables(devices: list[str]) -> None:
    """The measured rankings backend="auto" follows on this machine (fastattn.backends.dispatch)."""
    from fastattn.backends import dispatch

    for device in devices:
        name = dispatch.machine(device)
        entries = dispatch.table(name).entries
        print(f"dispatch table {name}: " + (f"{len(entries)} measured cases" if entries else
                                           "none: auto takes the backends in priority order"))
        for key, order in sorted(entries.items()):
            print(f"  {key:<40} {' > '.join(order)}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastattn")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, and which backends run here (and why not)")
    bench = sub.add_parser("bench", help="fastattn against torch SDPA and nn.MultiheadAttention")
    bench.add_argument("--quick", action="store_true", help="a small representative subset")
    bench.add_argument("--json", help="write the record here (its fields: README, The benchmark, Output)")
    bench.add_argument("--plot", help="write the TFLOPS charts, all in one PNG, to this path")
    bench.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    bench.add_argument("--tests", help="passed,failed,skipped counts of the GPU tests, for the record")
    bench.add_argument("--no-end-to-end", action="store_true", help="skip the whole-model timings")
    bench.add_argument("--table", metavar="RECORD", help="print a record's rows as the README's markdown table")
    sub.add_parser("train", help="train the notes' Transformer (python -m fastattn train --help)",
                   add_help=False)
    sub.add_parser("tune", help="sweep the Triton kernels' configurations into their defaults; with --dispatch, "
                   "time the backends into this machine's dispatch table (--help)", add_help=False)
    sub.add_parser("report", help="compile the Triton and Gluon kernels for sm_90 and report registers, spills, SASS (--help)",
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "train":
        from fastattn.models.train import main as train

        train(rest)
    elif args.command == "tune" and "--dispatch" in rest:
        from fastattn.bench.dispatch_sweep import main as tune_dispatch

        raise SystemExit(tune_dispatch(rest))
    elif args.command == "tune":
        from fastattn.bench.triton_sweep import main as tune

        raise SystemExit(tune(rest))
    elif args.command == "report":
        import importlib.util

        from fastattn.triton.compile_report import main as report

        more = []
        if importlib.util.find_spec("triton.experimental.gluon") is not None:
            from fastattn.gluon.compile_report import report as gluon_report

            more.append(gluon_report)
        raise SystemExit(report(rest, more))
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    elif args.command == "info":
        info()
    elif args.table:
        import json

        from fastattn.bench.record_report import markdown_table

        print(markdown_table(json.loads(open(args.table).read())))
    else:
        from fastattn.bench.run import run

        run(quick=args.quick, json_path=args.json, plot_path=args.plot, device=args.device,
            tests=args.tests, end_to_end=not args.no_end_to_end)


if __name__ == "__main__":
    main()
