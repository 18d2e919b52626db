"""The bodies of the CLI commands, one small function each."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

from suite.config import load_config
from suite.errors import EXIT_BACKEND_FAILED, SuiteError
from suite.run_folder import RunFolder


def _apply_run_flags(cfg, args):
    """CLI flags over the config; a flag given is used even when it is 0 or empty."""
    if getattr(args, "backends", None) is not None:
        cfg.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        if not cfg.backends:
            raise SuiteError("--backends is empty: name at least one backend, e.g. --backends plaintext,null")
    for flag, attr in (("dataset", "name"), ("data_dir", "data_dir"), ("label_file", "label_file"),
                       ("pretrain_dataset", "pretrain_dataset"), ("split", "split")):
        if getattr(args, flag, None) is not None:
            setattr(cfg.dataset, attr, getattr(args, flag))
    if getattr(args, "model", None) is not None:
        cfg.model.name = args.model
    if getattr(args, "out", None) is not None:
        cfg.out = args.out
    if getattr(args, "seed", None) is not None:
        cfg.seed = args.seed
    if getattr(args, "quick", False):
        cfg.quick = True
    if getattr(args, "timeout", None) is not None:
        cfg.timeout_s = args.timeout
    return cfg


def _resume_config(args):
    """--resume continues the saved run as it was; an option that contradicts it is refused."""
    from suite.config import config_differences
    from suite.runner import load_resume

    resume = Path(args.resume)
    if args.overwrite:
        raise SuiteError("--resume and --overwrite contradict each other: resume keeps the run's results")
    if args.out is not None and Path(args.out).resolve() != resume.resolve():
        raise SuiteError(f"--resume {resume} writes into that folder; drop --out {args.out}")
    _, saved = load_resume(resume)
    base = load_config(args.config) if args.config else copy.deepcopy(saved)
    wanted = _apply_run_flags(base, args)
    conflicts = config_differences(saved, wanted)
    if conflicts:
        raise SuiteError(f"--resume {resume}: {'; '.join(conflicts)} contradicts the saved run; drop "
                         f"the option, or start a fresh run with a new --out")
    return saved


def cmd_run(args, console) -> int:
    from rich.markup import escape

    from suite.leaderboard import print_leaderboard, write_leaderboard
    from suite.results import read_run_state
    from suite.runner import failed_configurations, run

    if args.resume:
        cfg = _resume_config(args)
    else:
        cfg = _apply_run_flags(load_config(args.config), args)
    run_dir = run(cfg, console, resume=Path(args.resume) if args.resume else None,
                  overwrite=args.overwrite, executor=_executor(args))
    board = write_leaderboard(run_dir)
    print_leaderboard(board, console, wide=getattr(args, "wide", False))
    if not args.no_report:
        from suite.report import render_report

        console.print(f"report: {render_report(run_dir)}")
    console.print(f"run folder: {escape(str(run_dir))}")
    failed = failed_configurations(run_dir)
    if failed:
        total = len(read_run_state(run_dir)["backends"])
        console.file.flush()
        print(f"failed: {len(failed)} of {total} backend configurations failed ({', '.join(failed)}); "
              f"their errors are in {run_dir / 'run.json'}", file=sys.stderr)
        return EXIT_BACKEND_FAILED
    return 0


def _executor(args):
    """Where the run executes (command line only: it does not change what is measured)."""
    from suite.executors import ExecutorSpec

    slot = getattr(args, "ray_slot_resource", "suite_slot")
    return ExecutorSpec(kind=getattr(args, "executor", "local") or "local",
                        address=getattr(args, "ray_address", None), shards=getattr(args, "shards", None),
                        slot_resource=None if (slot or "").lower() == "none" else slot)


def cmd_list(args, console) -> int:
    from importlib.util import find_spec

    from rich.table import Table

    from suite.data.catalog import DATASETS
    from suite.errors import BackendUnavailable
    from suite.model_names import BUILTIN_MODELS
    from suite.registry_backends import BACKENDS

    table = Table(title="backends")
    for col in ("name", "track", "available", "why not / install"):
        table.add_column(col)
    for name in BACKENDS.names():          # read from LISTING tables: no backend is imported
        try:
            info = BACKENDS.listing(name)
        except BackendUnavailable as exc:
            table.add_row(name, "?", "no", str(exc))
            continue
        missing = [m for m in info["requires"] if find_spec(m) is None]
        why = f"missing {', '.join(missing)}: {info['install']}" if missing else ""
        table.add_row(name, info["track"], "no" if missing else "yes", why)
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
    """A run folder whose run.json and results.jsonl read cleanly (one-line error otherwise)."""
    from suite.results import read_results, read_run_state

    run_dir = Path(path)
    if not RunFolder(run_dir).run_json.exists() or not RunFolder(run_dir).results.exists():
        raise SuiteError(f"{run_dir} is not a run folder (needs run.json and results.jsonl)")
    read_run_state(run_dir)
    read_results(RunFolder(run_dir).results)
    return run_dir


def cmd_report(args, console) -> int:
    from suite.leaderboard import print_leaderboard, write_leaderboard
    from suite.report import render_report

    run_dir = _require_run_dir(args.run_dir)
    board = write_leaderboard(run_dir)
    print_leaderboard(board, console, wide=args.wide)
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
    if args.epochs is not None:
        cfg.model.epochs = args.epochs
    cfg.seed = args.seed
    path = train_checkpoint(cfg, Path(args.out), console, getattr(args, "architecture", "small-densenet"))
    console.print(f"checkpoint: {path}")
    return 0
