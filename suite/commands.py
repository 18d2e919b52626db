"""The bodies of the CLI commands, one small function each."""

from __future__ import annotations

from pathlib import Path

from suite.config import load_config
from suite.errors import SuiteError


def _apply_run_flags(cfg, args):
    if args.backends:
        cfg.backends = [b for b in args.backends.split(",") if b.strip()]
    for flag, attr in (("dataset", "name"), ("data_dir", "data_dir"), ("label_file", "label_file")):
        if getattr(args, flag, None):
            setattr(cfg.dataset, attr, getattr(args, flag))
    if getattr(args, "model", None):
        cfg.model.name = args.model
    if getattr(args, "out", None):
        cfg.out = args.out
    if getattr(args, "seed", None) is not None:
        cfg.seed = args.seed
    if getattr(args, "quick", False):
        cfg.quick = True
    if getattr(args, "timeout", None):
        cfg.timeout_s = args.timeout
    return cfg


def cmd_run(args, console) -> int:
    from suite.leaderboard import print_leaderboard, write_leaderboard
    from suite.runner import run

    cfg = _apply_run_flags(load_config(args.config), args)
    run_dir = run(cfg, console, resume=Path(args.resume) if args.resume else None)
    board = write_leaderboard(run_dir)
    print_leaderboard(board, console)
    if not args.no_report:
        from suite.report import render_report

        console.print(f"report: {render_report(run_dir)}")
    console.print(f"run folder: {run_dir}")
    return 0


def cmd_list(args, console) -> int:
    from importlib.util import find_spec

    from rich.table import Table

    from suite.data.catalog import DATASETS
    from suite.errors import BackendUnavailable
    from suite.model_source import BUILTIN_MODELS
    from suite.registry_backends import BACKENDS

    table = Table(title="backends")
    for col in ("name", "track", "available", "why not / extra"):
        table.add_column(col)
    for name in BACKENDS.names():
        try:
            cls = BACKENDS.load(name)
            missing = [m for m in getattr(cls, "requires", ()) if find_spec(m) is None]
            why = f"missing {', '.join(missing)}: pip install -e '.[{cls.extra}]'" if missing else ""
            table.add_row(name, cls.track, "no" if missing else "yes", why)
        except BackendUnavailable as exc:
            table.add_row(name, "?", "no", str(exc))
    console.print(table)
    ds = Table(title="datasets")
    ds.add_column("name")
    ds.add_column("loader")
    for name in DATASETS.names():
        ds.add_row(name, DATASETS.target(name))
    console.print(ds)
    models = Table(title="models")
    models.add_column("--model")
    models.add_column("what")
    for name, what in BUILTIN_MODELS.items():
        models.add_row(name, what)
    models.add_row("xrv:<weights>", "torchxrayvision pretrained DenseNet-121 from its cache, "
                   "e.g. xrv:densenet121-res224-all")
    models.add_row("<path>.pt", "a checkpoint written by `python -m suite train`")
    console.print(models)
    return 0


def _require_run_dir(path: str) -> Path:
    run_dir = Path(path)
    if not (run_dir / "run.json").exists() or not (run_dir / "results.jsonl").exists():
        raise SuiteError(f"{run_dir} is not a run folder (needs run.json and results.jsonl)")
    return run_dir


def cmd_report(args, console) -> int:
    from suite.leaderboard import print_leaderboard, write_leaderboard
    from suite.report import render_report

    run_dir = _require_run_dir(args.run_dir)
    board = write_leaderboard(run_dir)
    print_leaderboard(board, console)
    console.print(f"report: {render_report(run_dir)}")
    return 0


def cmd_compare(args, console) -> int:
    from suite.compare import compare_runs, print_comparison

    a, b = _require_run_dir(args.run_a), _require_run_dir(args.run_b)
    print_comparison(compare_runs(a, b), console)
    from suite.report.compare_page import write_compare_page
    console.print(f"compare page: {write_compare_page(a, b)}")
    return 0


def cmd_train(args, console) -> int:
    from suite.train_command import train_checkpoint

    cfg = load_config(args.config)
    cfg.dataset.name = args.dataset
    if args.data_dir:
        cfg.dataset.data_dir = args.data_dir
    if args.label_file:
        cfg.dataset.label_file = args.label_file
    if args.epochs:
        cfg.model.epochs = args.epochs
    cfg.seed = args.seed
    path = train_checkpoint(cfg, Path(args.out), console)
    console.print(f"checkpoint: {path}")
    return 0
