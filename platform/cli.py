"""The `ioulab` command line. Each subcommand's module is imported only when it runs.

    ioulab data synth --out DIR          synthetic COCO-format dataset
    ioulab train [--config C] [--set k=v]   one training run (+ evaluation), logged to MLflow
    ioulab eval --checkpoint PATH           evaluate a saved checkpoint
    ioulab sweep SPACE.yaml                 a Ray Tune sweep (search_spaces/)
    ioulab report SWEEP / ioulab compare RUN...   ablation tables from MLflow
    ioulab selftest [--device cpu|cuda]     check a node: op, AMP training, inference modes, timers
    ioulab bench {train,prroi,nms,latency,sweep,eval}   benchmarks: a table, and JSON with --json
"""
from __future__ import annotations

import argparse
import importlib
import sys

from ioulab.detector.errors import UserError

# The name -> module table of the CLI edge (the only place a string picks code).
BENCHES = {
    "train": "ioulab.platform.bench.train",
    "prroi": "ioulab.platform.bench.prroi",
    "nms": "ioulab.platform.bench.nms",
    "latency": "ioulab.platform.bench.latency",
    "sweep": "ioulab.platform.bench.sweep",
    "eval": "ioulab.platform.bench.eval",
}
COMMANDS = {
    "train": "ioulab.platform.commands.train",
    "eval": "ioulab.platform.commands.evaluate",
    "sweep": "ioulab.platform.sweep.command",
    "report": "ioulab.platform.report.command",
    "compare": "ioulab.platform.report.compare",
    "selftest": "ioulab.platform.commands.selftest",
}


def _add_lazy(sub, name: str, module: str, help_text: str):
    parser = sub.add_parser(name, help=help_text)
    parser.set_defaults(_module=module)
    return parser


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ioulab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth", help="write the deterministic synthetic COCO-format dataset")
    synth.set_defaults(_module="ioulab.platform.commands.synth")

    helps = {"train": "train one model and evaluate it", "eval": "evaluate a checkpoint",
             "sweep": "run a Ray Tune sweep from a search space file",
             "report": "ablation report of a sweep from MLflow",
             "compare": "the ablation table for any MLflow runs",
             "selftest": "check the op, mixed-precision training, inference modes and timers on a device"}
    parsers = {name: _add_lazy(sub, name, mod, helps[name]) for name, mod in COMMANDS.items()}
    parsers["data synth"] = synth

    bench = sub.add_parser("bench", help="benchmarks (print a table; --json FILE writes it)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    for name, mod in BENCHES.items():
        p = bench_sub.add_parser(name, help=f"benchmark: {name}")
        p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
        p.set_defaults(_module=mod, _bench=True)
        parsers[f"bench {name}"] = p

    # Only the chosen subcommand's module is imported to add its arguments.
    chosen = _chosen_parser(argv, parsers)
    if chosen is not None:
        module = importlib.import_module(chosen.get_default("_module"))
        module.add_arguments(chosen)
    return parser


def _chosen_parser(argv, parsers):
    words = [a for a in argv if not a.startswith("-")]
    for n in (2, 1):
        key = " ".join(words[:n])
        if key in parsers:
            return parsers[key]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except UserError as exc:  # its message says what to fix: no traceback (exit 2, like argparse)
        print(f"ioulab: error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    module = importlib.import_module(args._module)
    if getattr(args, "_bench", False):
        from ioulab.platform.bench.common import format_table, to_json

        result = module.run(args)
        if getattr(args, "smoke_test", False):
            from ioulab.platform.smoke import MARK

            result.title = f"{MARK}: {result.title}"
        print(format_table(result), flush=True)
        if args.json:
            to_json(result, args.json)
            print(f"wrote {args.json}")
        return 0
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
