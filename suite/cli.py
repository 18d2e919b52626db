"""Command line: a thin dispatcher over small commands.

Errors the user can fix end as one line on stderr, never a traceback. Exit status:
0 all went well; 2 a bad invocation (bad option, file or value); 3 the run finished but
at least one backend configuration failed; 128 + signal number when interrupted.
"""

from __future__ import annotations

import argparse
import sys

from suite.errors import EXIT_USAGE, Interrupted, SuiteError


def _console():
    from rich.console import Console

    # Piped output (CI logs, files) gets a wide table instead of wrapped cells.
    width = None if sys.stdout.isatty() else 200
    return Console(stderr=False, highlight=False, width=width)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad invocation is one line like every other error (no usage dump)."""

    def error(self, message: str):
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def positive_seconds(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a number of seconds, got '{text}'") from None
    if not value > 0 or math.isnan(value):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got '{text}'")
    return value


def _integer(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects an integer, got '{text}'") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got '{text}'")
        return value

    parse.__name__ = "integer"
    return parse


def _backends_help() -> str:
    from suite.config import DEFAULT_BACKENDS

    return ("comma list, options as name:key=value (default: " + ",".join(DEFAULT_BACKENDS)
            + "; each expands into its configurations, e.g. dp's epsilon sweep and controls, "
              "with the plaintext reference first)")


def build_parser() -> argparse.ArgumentParser:
    from suite.config import DatasetConfig, ModelConfig, RunConfig

    run_d, data_d, model_d = RunConfig(), DatasetConfig(), ModelConfig()
    parser = OneLineParser(prog="python -m suite", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    run = sub.add_parser("run", help="run the benchmark and write a run folder")
    run.add_argument("--backends", help=_backends_help())
    run.add_argument("--dataset", help=f"dataset name (default {data_d.name})")
    run.add_argument("--data-dir", help="folder of a real dataset")
    run.add_argument("--label-file", help="label CSV, where the dataset needs one")
    run.add_argument("--pretrain-dataset", metavar="NAME[:DATA_DIR]",
                     help="the vendor's own data the default model trains on (real data needs it)")
    run.add_argument("--split", choices=("train-test", "all"),
                     help="all: score every image as a test image, for a model trained elsewhere "
                          f"(--model); default {data_d.split}")
    run.add_argument("--model", help="small-densenet | densenet121-random | xrv:<weights> | "
                     f"checkpoint.pt (default {model_d.name})")
    run.add_argument("--out", help="a new run folder (default reports/<run id>)")
    run.add_argument("--overwrite", action="store_true",
                     help="clear an existing run folder given as --out before running")
    run.add_argument("--config", help="TOML config file")
    run.add_argument("--seed", type=_integer(0), help=f"non-negative integer (default {run_d.seed})")
    run.add_argument("--quick", action="store_true", help="smaller data and sweeps")
    run.add_argument("--timeout", type=positive_seconds,
                     help=f"seconds per backend configuration, > 0 (default {run_d.timeout_s:g})")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    run.add_argument("--executor", choices=("local", "ray"), default="local",
                     help="local: one configuration after another on this machine (default); ray: "
                          "configurations and image shards on a Ray cluster (docs/scale-out.md)")
    run.add_argument("--ray-address", metavar="HOST:PORT",
                     help="the Ray cluster to use (default: RAY_ADDRESS, else a cluster started on this host)")
    run.add_argument("--shards", type=_integer(1),
                     help="ray: shards per inference configuration (default: one per measured slot)")
    run.add_argument("--ray-slot-resource", default="suite_slot", metavar="NAME",
                     help="ray: custom resource each node offers once, so a node runs one measured "
                          "job at a time (default suite_slot); 'none': schedule by CPUs (timings "
                          "then share cores)")
    run.add_argument("--wide", action="store_true",
                     help="print every leaderboard column, guarantees included (default: fits the terminal)")
    run.add_argument("--no-report", action="store_true", help="skip the HTML report")

    sub.add_parser("list", help="backends, datasets and models, and what is available")

    rep = sub.add_parser("report", help="re-render leaderboard and HTML from a run folder")
    rep.add_argument("run_dir")
    rep.add_argument("--wide", action="store_true",
                     help="every leaderboard column, guarantees included (default: fits the terminal)")

    cmp_ = sub.add_parser("compare", help="compare two run folders")
    cmp_.add_argument("run_a")
    cmp_.add_argument("run_b")

    train = sub.add_parser("train", help="train a checkpoint with the suite's plaintext recipe")
    train.add_argument("--dataset", default=data_d.name)
    train.add_argument("--data-dir")
    train.add_argument("--label-file")
    train.add_argument("--out", required=True, help="checkpoint path (.pt)")
    train.add_argument("--config", help="TOML config file ([dataset], [model])")
    train.add_argument("--seed", type=_integer(0), default=0)
    train.add_argument("--epochs", type=_integer(1))
    train.add_argument("--architecture", choices=("small-densenet", "densenet121"), default="small-densenet",
                       help="densenet121: torchxrayvision's DenseNet-121 (the seed study's model; "
                            "set [dataset] resolution = 224)")
    return parser


def main(argv: list[str] | None = None) -> int:
    import os

    # Before torch loads OpenMP: idle threads sleep rather than spin (see suite/runner.py).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:   # --help, or a bad invocation already reported in one line
        return int(exc.code or 0)
    from suite import commands
    from suite.procwatch import stop_on_signals

    handler = getattr(commands, f"cmd_{args.command}")
    try:
        with stop_on_signals():
            return handler(args, _console())
    except SuiteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (KeyboardInterrupt, Interrupted) as exc:
        sig = exc if isinstance(exc, Interrupted) else Interrupted("SIGINT")
        print(f"interrupted ({sig.signame}): {sig.hint()}", file=sys.stderr)
        return sig.exit_code
