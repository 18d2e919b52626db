"""`suite run`: plan, run each backend configuration in its own watched process,
score it, and append its rows before moving on (so a crash loses nothing written).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.markup import escape

from suite import SCHEMA_VERSION, __version__
from suite.config import RunConfig
from suite.control_ratio import fit_time_ratio_rows
from suite.data.catalog import load_dataset
from suite.data.imageset import ImageSet
from suite.data.roles import describe as describe_roles
from suite.errors import Interrupted, SuiteError
from suite.executors import ExecutorSpec
from suite.evaluate import accuracy_rows, cost_rows, paired_rows
from suite.harness import Job, part_paths
from suite.model_source import check_vendor_disjoint, resolve_model, vendor_description
from suite.paths import REPO_ROOT, cache_dir, reports_dir
from suite.planning import Planned, merged_entries, plan_backends
from suite.worker_launch import WorkerLauncher
from suite.results import (
    ResultRow,
    ResultWriter,
    note_torn_line,
    read_result_lines,
    read_results,
    read_run_state,
    rewrite_results,
    write_json_atomic,
    write_parquet_atomic,
)
from suite.run_folder import RunFolder
from suite.threat_model import ThreatModel

FINAL = ("ok", "failed", "skipped")   # a configuration's status once its worker is done
KEPT = ("ok", "skipped")               # what --resume keeps: a failed configuration runs again


def git_sha() -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "platform": platform.platform(),
           "cpus": str(os.cpu_count())}
    for pkg in ("torch", "torchvision", "torchxrayvision", "numpy", "scipy", "scikit-learn", "pandas"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


RUN_FILES = RunFolder.RUN_FILES


def holds_a_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in RUN_FILES)


def check_out_dir(out: str | None, run_id: str, overwrite: bool = False) -> Path:
    """Where this run will write, checked before any work and created only when the first
    file is written (so an early error leaves no empty folder behind).

    A folder that holds another run is refused (two runs would mix on one leaderboard)
    unless `overwrite`; a non-empty folder that holds no run is never cleared."""
    if out is None:
        base = reports_dir() / run_id
        run_dir, n = base, 1
        while run_dir.exists():
            n += 1
            run_dir = base.with_name(f"{base.name}-{n}")
        return run_dir
    run_dir = Path(out)
    if run_dir.exists() and not run_dir.is_dir():
        raise SuiteError(f"--out {run_dir} is an existing file, not a folder; give a new folder path")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not holds_a_run(run_dir):
            raise SuiteError(f"--out {run_dir} is a folder that is not empty and holds no run; "
                             f"give a new or empty folder")
        if not overwrite:
            raise SuiteError(f"--out {run_dir} already holds a run; continue it with --resume {run_dir}, "
                             f"give a fresh --out, or add --overwrite to replace it")
    ancestor = run_dir
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SuiteError(f"--out {run_dir} cannot be created: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise SuiteError(f"output folder {run_dir} is not writable: no write permission in {ancestor}")
    try:   # what os.access cannot tell (read-only mounts, /proc, quotas): try, leave nothing
        import tempfile

        os.rmdir(tempfile.mkdtemp(prefix=".suite-probe-", dir=ancestor))
    except OSError as exc:
        raise SuiteError(f"output folder {run_dir} is not writable: cannot create folders in "
                         f"{ancestor} ({exc.strerror or exc})") from None
    return run_dir


def create_run_dir(run_dir: Path, overwrite: bool = False) -> None:
    """Create the run folder (clearing the old run first when `overwrite`), and prove it writable."""
    import shutil

    try:
        if overwrite and run_dir.is_dir() and holds_a_run(run_dir):
            for child in run_dir.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise SuiteError(f"output folder {run_dir} is not writable: {exc.strerror or exc}") from None


def stratified_order(test: ImageSet, seed: int) -> np.ndarray:
    """A fixed order of test rows whose every prefix is balanced over sites and findings.

    Slow backends see a prefix; all prefixes are nested, so comparisons pair on the
    same images whatever subset size each backend uses.
    """
    rng = np.random.default_rng(seed + 7919)
    any_finding = np.nan_to_num(test.labels, nan=0).max(axis=1) > 0
    per_site = []
    for site in test.site_names():
        rows = np.flatnonzero(test.sites == site)
        pos, neg = rng.permutation(rows[any_finding[rows]]), rng.permutation(rows[~any_finding[rows]])
        merged = [r for pair in zip(pos, neg) for r in pair]
        longer = pos if len(pos) > len(neg) else neg
        merged += list(longer[min(len(pos), len(neg)):])
        per_site.append(merged)
    order = [site[i] for i in range(max(map(len, per_site))) for site in per_site if i < len(site)]
    return np.array(order, dtype=int)


class RunState:
    """run.json: what the run is and where each backend stands; rewritten atomically."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path, self.data = path, data

    def save(self) -> None:
        write_json_atomic(self.path, self.data)

    def backend(self, backend_id: str) -> dict[str, Any]:
        return self.data["backends"][backend_id]


def new_state(run_dir: Path, run_id: str, cfg: RunConfig, data: ImageSet, model_desc: dict,
              plans: list[Planned]) -> RunState:
    backends = {}
    for p in plans:
        tm = p.threat_model()
        backends[p.backend_id] = {
            "backend": p.name, "track": p.track, "status": "skipped" if p.unavailable else "pending",
            "error": p.unavailable, "reference": p.reference, "n_images": None, "options": p.options,
            "versions": {}, "tolerance": getattr(p.instance, "tolerance", None),
            "threat_model": _tm_dict(tm) if tm else None,
        }
    state = {
        "schema_version": SCHEMA_VERSION, "run_id": run_id,
        "started_at": datetime.now(timezone.utc).isoformat(), "finished_at": None,
        "git_sha": git_sha(), "suite_version": __version__, "seed": cfg.seed,
        "config_hash": cfg.hash(), "config": cfg.as_dict(),
        "dataset": {"name": data.name, "n_train": int((data.splits == "train").sum()),
                    "n_test": int((data.splits == "test").sum()), "label_names": data.label_names,
                    "sites": data.site_names(), "resolution": data.resolution,
                    "fingerprint": data.fingerprint(), "split": cfg.dataset.split},
        "model": model_desc, "versions": library_versions(), "backends": backends,
    }
    return RunState(RunFolder(run_dir).run_json, state)


def _tm_dict(tm: ThreatModel) -> dict[str, Any]:
    from dataclasses import asdict

    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(tm).items()}


def row_meta(state: RunState, backend_id: str) -> dict[str, Any]:
    d = state.data
    meta = {"run_id": d["run_id"], "git_sha": d["git_sha"], "config_hash": d["config_hash"],
            "seed": d["seed"], "suite_version": d["suite_version"]}
    tm = state.backend(backend_id).get("threat_model") or {}
    meta.update({f"tm_{k}": v for k, v in tm.items()})
    return meta


def base_fields(state: RunState, backend_id: str) -> dict[str, Any]:
    b = state.backend(backend_id)
    return {"backend": b["backend"], "backend_id": backend_id, "track": b["track"],
            "dataset": state.data["dataset"]["name"], "meta": row_meta(state, backend_id)}


def drop_rows(results_path: Path, backend_id: str) -> None:
    """Resume: remove rows of a backend that was interrupted between writing rows and status."""
    if not results_path.exists():
        return
    lines, torn = read_result_lines(results_path)
    keep = [line for line, row in lines if row.get("backend_id") != backend_id]
    if torn is not None or len(keep) != len(lines):
        rewrite_results(results_path, keep)


def repair_torn_tail(results_path: Path) -> None:
    """Resume after a crash mid-append: cut the torn last line, or new rows would be glued to it."""
    lines, torn = read_result_lines(results_path)
    if torn is not None:
        note_torn_line(results_path, torn)
        rewrite_results(results_path, [line for line, _ in lines])


def chosen_images(plan: Planned, data: ImageSet, order: np.ndarray) -> list[int]:
    """The dataset rows a configuration scores: its prefix of the stratified test order."""
    test_rows = np.flatnonzero(data.splits == "test")
    chosen = order if not plan.max_images else order[: plan.max_images]
    return sorted(int(test_rows[i]) for i in chosen)


def serving_model(plan: Planned, state: RunState, run_dir: Path, model_ref: dict,
                  writer: ResultWriter, console) -> dict | None:
    """The model a configuration serves; a composition whose trainer released none is
    recorded as failed here and gets None."""
    if not plan.model_from:
        return model_ref
    released = RunFolder(run_dir).released_model(plan.model_from)
    if state.backend(plan.model_from)["status"] == "ok" and released.exists():
        return {"kind": "checkpoint", "path": str(released)}
    error = (f"composition: {plan.model_from} released no model"
             + ("" if state.backend(plan.model_from)["status"] == "ok" else " (it failed)"))
    record_failure(plan, state, writer, console, error)
    return None


def record_failure(plan: Planned, state: RunState, writer: ResultWriter, console, error: str) -> None:
    state.backend(plan.backend_id).update(status="failed", error=error)
    writer.write([ResultRow(**base_fields(state, plan.backend_id), metric="status", value=None,
                            unit="", higher_is_better=None, status="failed", error=error)])
    state.save()
    console.print(f"  [red]failed[/red] {escape(plan.backend_id)}: {escape(error)}")


def make_job(plan: Planned, run_dir: Path, cfg: RunConfig, data_path: Path, test_index: list[int],
             model_ref: dict) -> Job:
    return Job(run_dir=str(run_dir), backend_id=plan.backend_id, backend=plan.name, options=plan.options,
               track=plan.track, dataset_path=str(data_path), test_index=test_index, model_ref=model_ref,
               seed=cfg.seed, threads=cfg.threads, quick=cfg.quick, cache_dir=str(cache_dir()))


def worker_env(cfg: RunConfig) -> dict[str, str]:
    # PASSIVE: idle OpenMP threads sleep instead of spinning; with spinning, a busy 2-core
    # machine made one forward/backward 100x slower and skewed every comparison.
    return {"OMP_NUM_THREADS": str(cfg.threads), "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}


def execute_backend(plan: Planned, state: RunState, run_dir: Path, cfg: RunConfig,
                    data_path: Path, data: ImageSet, order: np.ndarray, model_ref: dict,
                    writer: ResultWriter, console, launcher: WorkerLauncher | None = None) -> None:
    """The local executor: one watched worker process on this machine (forked from the run's
    fork server, or a fresh interpreter: `suite.worker_launch`)."""
    entry = state.backend(plan.backend_id)
    test_index = chosen_images(plan, data, order)
    model_ref = serving_model(plan, state, run_dir, model_ref, writer, console)
    if model_ref is None:
        return
    job = make_job(plan, run_dir, cfg, data_path, test_index, model_ref)
    meta_path, pred_path = part_paths(run_dir, plan.backend_id)
    meta_path.unlink(missing_ok=True)
    pred_path.unlink(missing_ok=True)            # a re-run (resume) never scores an older attempt's
    RunFolder(run_dir).released_model(plan.backend_id).unlink(missing_ok=True)   # files
    job_path = meta_path.with_suffix(".job.json")
    job.save(job_path)
    entry.update(status="running", n_images=len(test_index))
    state.save()
    progress_path = RunFolder(run_dir).progress(plan.backend_id)
    progress_path.unlink(missing_ok=True)
    launcher = launcher or WorkerLauncher({**os.environ, **worker_env(cfg)}, console, use_fork=False)
    with ProgressLine(console, progress_path, plan.backend_id) as shown:
        proc = launcher.run(job_path, cfg.timeout_s, meta_path.with_suffix(".log"), on_poll=shown.poll)
    entry.update(worker_start=proc.start_mode, worker_cpu_s=proc.cpu_s)
    part = json.loads(meta_path.read_text()) if meta_path.exists() else None
    error = worker_error(proc.timed_out, proc.returncode, part, cfg.timeout_s)
    if error and proc.lost and part is None:
        error = "the worker fork server died while the worker ran (see the run's stderr)"
    if error:
        record_failure(plan, state, writer, console, error)
        return
    score_part(plan, state, run_dir, cfg, part, proc.__dict__, writer, console,
               annotate=lambda rows: note_wall_time(rows, proc.start_mode))


WALL_TIME_NOTES = {
    "fork-server": "from the request to fork the worker to its end; the fork server imported "
                   "torch and the harness once for the run, not counted here",
    "fresh-interpreter": "from starting the worker process (`python -m suite.worker`) to its end, "
                         "interpreter start and imports included",
}


def note_wall_time(rows: list[ResultRow], start_mode: str) -> list[ResultRow]:
    """Say on the wall_time row what it spans, which depends on how the worker started."""
    for row in rows:
        if row.metric == "wall_time" and not row.note:
            row.note = WALL_TIME_NOTES.get(start_mode)
    return rows


def worker_error(timed_out: bool, returncode, part: dict | None, timeout_s: float) -> str | None:
    """Why a worker's job failed (None when it reported ok): one wording for local and Ray runs."""
    if timed_out:
        return f"timed out after {timeout_s:.0f} s (limit timeout_s)"
    if part is None:
        if isinstance(returncode, int) and returncode < 0:
            import signal

            try:
                name = signal.Signals(-returncode).name
            except ValueError:
                name = f"signal {-returncode}"
            return f"worker was killed by {name} (exit code {returncode}) before reporting"
        return f"worker died with exit code {returncode} before reporting"
    if part["status"] != "ok":
        return part["error"]
    return None


def score_part(plan: Planned, state: RunState, run_dir: Path, cfg: RunConfig, part: dict,
               proc: dict, writer: ResultWriter, console, annotate=None) -> None:
    """Rows of a finished configuration from its part (one worker's, or its shards' merged):
    accuracy on its predictions, the paired comparison with its reference, costs.
    `annotate(rows)` lets an executor qualify rows whose meaning it changes."""
    entry = state.backend(plan.backend_id)
    _, pred_path = part_paths(run_dir, plan.backend_id)
    preds = pd.read_parquet(pred_path)
    base = base_fields(state, plan.backend_id)
    labels = state.data["dataset"]["label_names"]
    rows = accuracy_rows(base, preds, labels, cfg.seed)
    ref = plan.reference
    if ref and state.backend(ref)["status"] == "ok":
        _, ref_pred_path = part_paths(run_dir, ref)
        rows += [_with_reference(r, ref) for r in
                 paired_rows(base, preds, pd.read_parquet(ref_pred_path), labels, cfg.seed)]
    rows += cost_rows(base, part, proc)
    if plan.track == "training" and ref and state.backend(ref)["status"] == "ok":
        ref_part = json.loads(part_paths(run_dir, ref)[0].read_text())
        rows += fit_time_ratio_rows(base, part, ref_part, ref)
    if annotate is not None:
        rows = annotate(rows)
    writer.write(rows)
    entry.update(status="ok", error=None, versions=part.get("versions", {}))
    state.save()
    n_images = part.get("n_images") or 0
    console.print(f"  [green]ok[/green] {escape(plan.backend_id)}: {n_images} images, "
                  f"{proc['wall_s']:.1f} s wall, peak {proc['peak_rss'] / 2**20:.0f} MiB")


PLAIN_PROGRESS_EVERY_S = 30.0   # not a terminal (CI logs, files): a plain line at most this often


class ProgressLine:
    """Shows what the worker's harness reports in its progress file: images done of total,
    rate and time left; a live rich line on a terminal, else a plain line every ~30 s."""

    def __init__(self, console, path: Path, backend_id: str) -> None:
        self.console, self.path, self.backend_id = console, path, backend_id
        self.live = None
        self.last_plain = None

    def __enter__(self) -> "ProgressLine":
        if self.console.is_terminal:
            from rich.progress import Progress

            self.live = Progress(console=self.console, transient=True)
            self.live.start()
            self.task = self.live.add_task(escape(self.backend_id), total=None)
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.stop()

    def poll(self) -> None:
        try:
            p = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return   # not started predicting yet
        done, total, elapsed = p["done"], p["total"], p["elapsed_s"]
        text = describe_progress(done, total, elapsed)
        if self.live is not None:
            self.live.update(self.task, completed=done, total=total,
                             description=f"{escape(self.backend_id)}: {text}")
        elif done and (self.last_plain is None
                       or time.monotonic() - self.last_plain >= PLAIN_PROGRESS_EVERY_S):
            self.last_plain = time.monotonic()
            self.console.print(f"  {escape(self.backend_id)}: {text}")


def describe_progress(done: int, total: int, elapsed_s: float) -> str:
    """'12/97 images, 0.41 img/s, about 3 min 27 s left' (rate over the predict phase so far)."""
    return describe_rate(done, total, done, elapsed_s)


def describe_rate(done: int, total: int, new: int, elapsed_s: float) -> str:
    """`done` of `total` images, the rate over the `new` of them made in `elapsed_s` (the Ray
    executor's: this session's images, all shards together, so the cluster's rate)."""
    if not new or elapsed_s <= 0:
        return f"{done}/{total} images"
    rate = new / elapsed_s
    left = round((total - done) / rate)
    eta = f"{left // 60} min {left % 60} s" if left >= 60 else f"{left} s"
    return f"{done}/{total} images, {rate:.3g} img/s, about {eta} left"


def _with_reference(row: ResultRow, ref: str) -> ResultRow:
    row.reference = ref
    return row


def consolidate_predictions(run_dir: Path, state: RunState) -> None:
    frames = []
    for backend_id, entry in state.data["backends"].items():
        _, pred_path = part_paths(run_dir, backend_id)
        if entry["status"] == "ok" and pred_path.exists():
            frames.append(pd.read_parquet(pred_path))
    if frames:
        write_parquet_atomic(pd.concat(frames, ignore_index=True), RunFolder(run_dir).predictions)


def map_labels_to_model(data: ImageSet, data_path: Path, bundle, console):
    """Score only labels the model predicts. For pretrained xrv weights the rest are reported
    (run.json `unmapped_labels`), never silently dropped; a suite checkpoint must match exactly."""
    from suite.data.catalog import save_npz

    unmapped = [n for n in data.label_names if n not in bundle.pathologies]
    if not unmapped:
        return data, data_path, []
    if bundle.source != "xrv-weights":
        bundle.output_index(data.label_names)  # raises a clear error
    keep = [j for j, n in enumerate(data.label_names) if n not in unmapped]
    if not keep:
        raise SuiteError(f"model '{bundle.name}' predicts none of the dataset's labels {data.label_names}")
    console.print(f"[yellow]note[/yellow]: model {bundle.name} has no output for "
                  f"{', '.join(unmapped)}; these labels are not scored")
    mapped = data.with_labels(keep)
    path = data_path.with_name(data_path.stem + f"-for-{bundle.name.replace(':', '_')}.npz")
    save_npz(mapped, path)
    return mapped, path, unmapped


def check_checkpoint_file(name: str) -> None:
    """A clear error for a --model file that is no checkpoint at all: a text file, an empty
    or truncated .pt (torch's own errors read `OSError: [Errno 22]` or `UnpicklingError`)."""
    import zipfile

    path = Path(name)
    if not path.exists():
        return   # resolve_model says "checkpoint not found" (or "unknown model")
    if path.is_dir():
        raise SuiteError(f"--model {path} is a folder, not a checkpoint file (.pt)")
    with open(path, "rb") as fh:
        head = fh.read(1024)
    if head.startswith(b"PK\x03\x04"):           # torch.save's zip format
        try:
            with zipfile.ZipFile(path) as zf:
                zf.namelist()
        except (zipfile.BadZipFile, OSError):
            raise SuiteError(f"model checkpoint {path} is corrupt or truncated (an incomplete "
                             f"PyTorch file); write it again with `python -m suite train`") from None
        return
    if head.startswith(b"\x80"):                  # torch's legacy pickle format
        return
    if not head:
        raise SuiteError(f"model checkpoint {path} is empty (0 bytes); write it again with "
                         f"`python -m suite train`")
    kind = "a text file" if b"\x00" not in head else "not a PyTorch file"
    raise SuiteError(f"--model {path} is {kind}, not a checkpoint written by `python -m suite train`")


def check_model_resolution(bundle, data: ImageSet) -> None:
    """A model trained at one side length must see images of that side length."""
    if bundle.source in ("checkpoint", "xrv-weights") and bundle.resolution != data.resolution:
        raise SuiteError(
            f"model '{bundle.name}' expects {bundle.resolution} px images but the dataset is "
            f"{data.resolution} px; set [dataset] resolution = {bundle.resolution}")


def load_resume(resume: Path) -> tuple[dict[str, Any], RunConfig]:
    """The saved state and config of a run to continue; a torn or foreign run.json is refused."""
    from suite.config import config_from_dict

    saved = read_run_state(Path(resume))
    try:
        cfg = config_from_dict(saved["config"])
    except SuiteError as exc:
        raise SuiteError(f"{Path(resume) / 'run.json'}: saved config is invalid: {exc}") from None
    return saved, cfg


def run(cfg: RunConfig, console, resume: Path | None = None, overwrite: bool = False,
        executor: ExecutorSpec | None = None) -> Path:
    """The whole `suite run`; returns the run folder. Interrupted (Ctrl-C, SIGTERM, SIGHUP),
    it raises `Interrupted` naming the folder to resume, or none when nothing was written."""
    where: list[Path] = []
    try:
        return _run(cfg, console, resume, overwrite, where, executor or ExecutorSpec())
    except (KeyboardInterrupt, Interrupted) as exc:
        name = exc.signame if isinstance(exc, Interrupted) else "SIGINT"
        written = where and RunFolder(where[0]).run_json.exists()
        raise Interrupted(name, where[0] if written else None) from None


def _run(cfg: RunConfig, console, resume: Path | None, overwrite: bool, where: list[Path],
         executor: ExecutorSpec) -> Path:
    if resume is not None:
        saved, cfg = load_resume(resume)
        run_id, run_dir = saved["run_id"], Path(resume)
    else:
        run_id = time.strftime("%Y%m%d-%H%M%S") + f"-{cfg.hash()[:6]}"
        run_dir = check_out_dir(cfg.out, run_id, overwrite)
    where.append(run_dir)
    check_split_mode(cfg)
    plans = plan_backends(cfg)
    if cfg.dataset.split == "all":
        skip_training_rows(plans)
    for note in merged_entries(plans):
        console.print(f"[yellow]note[/yellow]: {escape(note)}")
    if cfg.model.name.endswith(".pt") or Path(cfg.model.name).is_file():
        check_checkpoint_file(cfg.model.name)
    console.print(f"run [bold]{run_id}[/bold] -> {run_dir}")
    launcher = None
    if executor.kind != "ray" and has_work(plans, saved if resume is not None else None):
        # started now: its one-off preload overlaps loading the data and the model below
        launcher = WorkerLauncher({**os.environ, **worker_env(cfg)}, console).begin()
    try:
        return _run_started(cfg, console, resume, overwrite, run_id, run_dir, plans, executor, launcher,
                            saved if resume is not None else None)
    finally:
        if launcher is not None:
            launcher.close()


def has_work(plans: list[Planned], saved: dict | None) -> bool:
    """Whether any configuration will run a worker (a fresh run's available ones; a resumed
    run's not yet kept)."""
    if saved is None:
        return any(p.unavailable is None for p in plans)
    return any(b.get("status") not in KEPT for b in saved.get("backends", {}).values())


def _run_started(cfg: RunConfig, console, resume: Path | None, overwrite: bool, run_id: str,
                 run_dir: Path, plans: list[Planned], executor: ExecutorSpec,
                 launcher: WorkerLauncher | None, saved: dict | None) -> Path:
    from rich.progress import Progress

    data, data_path = load_dataset(cfg.dataset, cfg.seed, cfg.quick)
    console.print(f"dataset {data.name}: {(data.splits == 'train').sum()} train / "
                  f"{(data.splits == 'test').sum()} test images, {len(data.site_names())} sites, "
                  f"{data.resolution}px, labels {', '.join(data.label_names)}")
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"model {cfg.model.name}", total=None)
        bundle, model_ref = resolve_model(cfg.model, data, cfg.seed, cfg.quick,
                                          progress=lambda e, loss: progress.update(
                                              task, description=f"training {cfg.model.name}: epoch {e + 1}, loss {loss:.3f}"),
                                          dataset_cfg=cfg.dataset)
    check_model_resolution(bundle, data)
    # data roles: the vendor's images must be none of the hospitals' (train too when a
    # training row treats that split as the hospitals' private data)
    checked = ("train", "test") if any(p.track == "training" for p in plans) else ("test",)
    check_vendor_disjoint(bundle, data, checked, cfg.dataset.name)
    data_roles = describe_roles(data, vendor_description(bundle), checked)
    data, data_path, unmapped = map_labels_to_model(data, data_path, bundle, console)
    if resume is not None:
        state = RunState(RunFolder(run_dir).run_json, saved)
        check_resume_matches(state, data, plans, run_dir)
        repair_torn_tail(RunFolder(run_dir).results)
    else:
        state = new_state(run_dir, run_id, cfg, data, bundle.describe(), plans)
        state.data["dataset"]["unmapped_labels"] = unmapped
        state.data["data_roles"] = data_roles
        create_run_dir(run_dir, overwrite)
    state.save()
    run_pending(plans, state, run_dir, cfg, data_path, data, model_ref, console, executor, launcher)
    return run_dir


def check_split_mode(cfg: RunConfig) -> None:
    """Validate mode scores a model trained elsewhere; the default one is trained by this run."""
    if cfg.dataset.split == "all" and cfg.model.name == "small-densenet":
        raise SuiteError("--split all validates a model trained elsewhere: pass --model "
                         "(a checkpoint from `suite train` on other data, or xrv:<weights>)")


def skip_training_rows(plans: list[Planned]) -> None:
    """With every image a test image there is no training split: training rows (and the
    compositions serving what they release) are skipped, with the reason recorded."""
    training = {p.backend_id for p in plans if p.track == "training"}
    for p in plans:
        if p.unavailable is None and (p.backend_id in training or p.model_from in training):
            p.unavailable = ("--split all: every image is a test image, so there is no training "
                             "split for a training-track row")


def check_resume_matches(state: RunState, data: ImageSet, plans: list[Planned], run_dir: Path) -> None:
    """Continue only the run that was started: same data, same configurations."""
    saved_fp = state.data["dataset"].get("fingerprint")
    if saved_fp and saved_fp != data.fingerprint():
        raise SuiteError(f"--resume {run_dir}: the dataset changed since the run started (fingerprint "
                         f"{saved_fp}, now {data.fingerprint()}); start a fresh run with a new --out")
    missing = [p.backend_id for p in plans if p.backend_id not in state.data["backends"]]
    if missing:
        raise SuiteError(f"--resume {run_dir}: the saved run has no configuration {', '.join(missing)} "
                         f"(the suite changed since); start a fresh run with a new --out")


def run_pending(plans: list[Planned], state: RunState, run_dir: Path, cfg: RunConfig, data_path: Path,
                data: ImageSet, model_ref: dict, console, executor: ExecutorSpec | None = None,
                launcher: WorkerLauncher | None = None) -> None:
    """Run every configuration not kept yet: all of a fresh run's, and on --resume the ones
    missing or failed (a failed one's rows are dropped first, so nothing counts twice)."""
    writer = ResultWriter(RunFolder(run_dir).results)
    order = stratified_order(data.split("test"), cfg.seed)
    pending = [p for p in plans if state.backend(p.backend_id)["status"] not in KEPT]
    if executor is not None and executor.kind == "ray":
        from suite.executors.ray_executor import run_on_ray

        if pending:
            run_on_ray(pending, state, run_dir, cfg, data_path, data, order, model_ref, writer,
                       console, executor)
    else:
        for i, plan in enumerate(pending, 1):
            console.print(f"[{i}/{len(pending)}] {escape(plan.backend_id)} ({plan.track})")
            drop_rows(writer.path, plan.backend_id)
            execute_backend(plan, state, run_dir, cfg, data_path, data, order, model_ref, writer, console,
                            launcher)
        if launcher is not None:
            state.data["worker_start"] = launcher.describe()
    recorded = set(read_results(writer.path)["backend_id"].dropna())
    for p in plans:
        if p.unavailable and p.backend_id not in recorded:
            writer.write([ResultRow(**base_fields(state, p.backend_id), metric="status", value=None,
                                    unit="", higher_is_better=None, status="skipped",
                                    error=p.unavailable)])
    state.data["finished_at"] = datetime.now(timezone.utc).isoformat()
    state.save()
    consolidate_predictions(run_dir, state)


def failed_configurations(run_dir: Path) -> list[str]:
    """Backend configurations of a finished run whose status is 'failed'."""
    state = read_run_state(run_dir)
    return [bid for bid, b in state["backends"].items() if b.get("status") == "failed"]
