"""Command line: a thin dispatcher over small commands.

Errors the user can fix end as one line on stderr with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from suite.errors import SuiteError


def _console():
    from rich.console import Console

    # Piped output (CI logs, files) gets a wide table instead of wrapped cells.
    width = None if sys.stdout.isatty() else 200
    return Console(stderr=False, highlight=False, width=width)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m suite", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the benchmark and write a run folder")
    run.add_argument("--backends", help="comma list, options as name:key=value (default plaintext,null)")
    run.add_argument("--dataset", help="dataset name (default synthetic)")
    run.add_argument("--data-dir", help="folder of a real dataset")
    run.add_argument("--label-file", help="label CSV, where the dataset needs one")
    run.add_argument("--pretrain-dataset", metavar="NAME[:DATA_DIR]",
                     help="the vendor's own data the default model trains on (real data needs it)")
    run.add_argument("--model", help="small-densenet | densenet121-random | xrv:<weights> | checkpoint.pt")
    run.add_argument("--out", help="run folder (default reports/<run id>)")
    run.add_argument("--config", help="TOML config file")
    run.add_argument("--seed", type=int)
    run.add_argument("--quick", action="store_true", help="smaller data and sweeps")
    run.add_argument("--timeout", type=float, help="seconds per backend configuration")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    run.add_argument("--no-report", action="store_true", help="skip the HTML report")

    sub.add_parser("list", help="backends, datasets and models, and what is available")

    rep = sub.add_parser("report", help="re-render leaderboard and HTML from a run folder")
    rep.add_argument("run_dir")

    cmp_ = sub.add_parser("compare", help="compare two run folders")
    cmp_.add_argument("run_a")
    cmp_.add_argument("run_b")

    train = sub.add_parser("train", help="train a checkpoint with the suite's plaintext recipe")
    train.add_argument("--dataset", default="synthetic")
    train.add_argument("--data-dir")
    train.add_argument("--label-file")
    train.add_argument("--out", required=True, help="checkpoint path (.pt)")
    train.add_argument("--config", help="TOML config file ([dataset], [model])")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--epochs", type=int)
    return parser


def main(argv: list[str] | None = None) -> int:
    import os

    # Before torch loads OpenMP: idle threads sleep rather than spin (see suite/runner.py).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    from suite import commands

    handler = getattr(commands, f"cmd_{args.command}")
    try:
        return handler(args, _console())
    except SuiteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: results written so far are kept; continue with --resume RUN_DIR",
              file=sys.stderr)
        return 130
