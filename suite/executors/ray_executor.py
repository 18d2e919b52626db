"""The Ray executor: backend configurations, and shards of the test images of inference-
track ones, run as Ray tasks on a cluster; their parts are merged into one run folder and
scored on this machine exactly as a local run's part would be.

Honest timing: every task asks for one unit of a custom resource (`suite_slot` unless told
otherwise) that each node offers once, so a node runs one measured job at a time and no two
jobs compete for its cores. The wall time of a sharded configuration is the executor's
(first shard started to last shard finished), never a sum of shard latencies; which node ran
which shard is kept in the shard parts and in run.json.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.markup import escape

from suite.errors import SuiteError
from suite.executors import ExecutorSpec
from suite.executors.shards import (
    complete_shard,
    merge_parts,
    merge_predictions,
    shard_count,
    shard_summary,
    split_images,
    write_bytes_atomic,
    write_shard,
)
from suite.harness import Job
from suite.results import write_json_atomic, write_parquet_atomic
from suite.run_folder import RunFolder

PLAIN_PROGRESS_EVERY_S = 30.0


@dataclass
class Unit:
    """One configuration on the cluster: its shards, their tasks and their records."""

    plan: Any
    shards: list[list[int]] = field(default_factory=list)
    tasks: dict[int, Any] = field(default_factory=dict)       # shard -> ObjectRef
    records: dict[int, dict] = field(default_factory=dict)    # shard -> its part record
    submitted: bool = False
    done: bool = False                                        # scored or recorded as failed

    def finished(self) -> bool:
        return self.submitted and len(self.records) == len(self.shards)


def connect(spec: ExecutorSpec):

    try:
        import ray
    except ImportError:
        raise SuiteError("--executor ray needs Ray: pip install 'flwr[simulation]' (or 'ray')") from None
    address = spec.address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False,
                 configure_logging=False)
    except ConnectionError as exc:
        raise SuiteError(f"--executor ray: no Ray cluster at {address} ({exc}); start one with "
                         f"`ray start --head --resources '{{\"suite_slot\": 1}}'` or pass "
                         f"--ray-address HOST:PORT") from None
    return ray


def slots(ray, spec: ExecutorSpec) -> int:
    """How many measured jobs the cluster runs at once (nodes offering the slot resource)."""
    resource = spec.slot_resource or "CPU"
    total = ray.cluster_resources().get(resource, 0)
    if total < 1:
        raise SuiteError(f"the Ray cluster offers no '{resource}' resource: start each node with "
                         f"`ray start ... --resources '{{\"{resource}\": 1}}'` (one measured job per "
                         f"node at a time), or pass --ray-slot-resource none")
    return int(total)


def task_options(spec: ExecutorSpec, threads: int) -> dict[str, Any]:
    if spec.slot_resource:
        return {"num_cpus": 0, "resources": {spec.slot_resource: 1}}
    return {"num_cpus": threads}


def run_on_ray(pending: list, state, run_dir: Path, cfg, data_path: Path, data, order,
               model_ref: dict, writer, console, spec: ExecutorSpec) -> None:
    from suite import runner
    from suite.executors.ray_task import ProgressBoard, run_shard

    ray = connect(spec)
    folder = RunFolder(run_dir)
    started = time.perf_counter()
    try:
        n_slots = slots(ray, spec)
        nodes = [{"node_id": n["NodeID"], "node_ip": n["NodeManagerAddress"]}
                 for n in ray.nodes() if n.get("Alive")]
        state.data["executor"] = {**spec.describe(), "slots": n_slots, "nodes": nodes, "wall_s": None,
                                  "ray_version": ray.__version__}
        state.save()
        console.print(f"ray: {len(nodes)} nodes, {n_slots} measured slots "
                      f"({escape(spec.slot_resource or 'CPU')})")
        remote = ray.remote(run_shard).options(**task_options(spec, cfg.threads), max_retries=2)
        board = ray.remote(num_cpus=0, max_restarts=-1)(ProgressBoard).remote()
        dataset_ref = ray.put(Path(data_path).read_bytes())
        model_refs: dict[str, Any] = {}
        test_rows = np.flatnonzero(data.splits == "test")
        order_rank = {int(test_rows[i]): rank for rank, i in enumerate(order)}
        units = [Unit(p) for p in pending]
        by_id = {u.plan.backend_id: u for u in units}
        env = {**runner.worker_env(cfg), "SUITE_DRIVER_NICE": str(os.nice(0))}

        def submit(unit: Unit) -> None:
            plan = unit.plan
            unit.submitted = True
            ref = runner.serving_model(plan, state, run_dir, model_ref, writer, console)
            if ref is None:
                unit.done = True
                return
            test_index = runner.chosen_images(plan, data, order)
            unit.shards = shard_plan(folder, plan, test_index, order_rank, n_slots, spec.shards)
            blob = None
            if ref.get("kind") == "checkpoint":
                if ref["path"] not in model_refs:
                    model_refs[ref["path"]] = ray.put(Path(ref["path"]).read_bytes())
                blob = model_refs[ref["path"]]
            folder.shards_dir(plan.backend_id).mkdir(parents=True, exist_ok=True)
            for k, index in enumerate(unit.shards):
                job = runner.make_job(plan, run_dir, cfg, data_path, index, ref)
                job.save(folder.shard_job(plan.backend_id, k))
                kept = complete_shard(folder, plan.backend_id, k, index)
                if kept is not None:          # --resume: this shard's part is whole; keep it
                    unit.records[k] = kept
                    continue
                unit.tasks[k] = remote.remote(job.__dict__, dataset_ref, blob, board,
                                              f"{plan.backend_id}#{k}", cfg.timeout_s, env)
            entry = state.backend(plan.backend_id)
            entry.update(status="running", n_images=len(test_index),
                         shards=[{"shard": k, "n_images": len(ix)} for k, ix in enumerate(unit.shards)])
            state.save()
            kept = len(unit.records)
            console.print(f"  {escape(plan.backend_id)} ({plan.track}): {len(test_index)} images in "
                          f"{len(unit.shards)} shard(s)" + (f", {kept} kept from before" if kept else ""))

        for unit in units:
            runner.drop_rows(writer.path, unit.plan.backend_id)
            trainer = unit.plan.model_from
            if not (trainer in by_id and not by_id[trainer].done):
                submit(unit)
        shown = ProgressBoardView(console)
        with shown:
            for unit in units:
                if not unit.submitted:
                    submit(unit)                     # a composition: its trainer is scored now
                while not unit.done and not unit.finished():
                    collect(ray, units, folder, cfg, timeout_s=1.0)
                    shown.show(units, board_snapshot(ray, board))
                if not unit.done:
                    shown.show([unit], board_snapshot(ray, board), final=True)
                    shown.pause()
                    finish(unit, state, run_dir, cfg, writer, console, n_slots)
                    shown.resume()
                for waiting in units:                # compositions waiting on this trainer
                    if not waiting.submitted and waiting.plan.model_from == unit.plan.backend_id:
                        submit(waiting)
    finally:
        if "executor" in state.data:
            state.data["executor"]["wall_s"] = time.perf_counter() - started
            state.save()
        ray.shutdown()


def board_snapshot(ray, board) -> dict:
    """Progress so far; {} when the board is unreachable (progress is for the person
    watching, never a reason to fail a run)."""
    try:
        return ray.get(board.snapshot.remote(), timeout=10)
    except Exception:  # noqa: BLE001 - a restarting or lost actor
        return {}


def shard_plan(folder: RunFolder, plan, test_index: list[int], order_rank: dict[int, int],
               n_slots: int, wanted: int | None) -> list[list[int]]:
    """The run's own shards when it is resumed (the cluster may have changed size since),
    else a fresh split; a saved split that no longer covers the images is replaced."""
    saved, k = [], 0
    while folder.shard_job(plan.backend_id, k).exists():
        try:
            saved.append(Job.load(folder.shard_job(plan.backend_id, k)).test_index)
        except (OSError, ValueError, TypeError):
            saved = []
            break
        k += 1
    if saved and sorted(i for s in saved for i in s) == sorted(test_index):
        return saved
    if folder.shards_dir(plan.backend_id).exists():
        import shutil

        shutil.rmtree(folder.shards_dir(plan.backend_id))
    n = shard_count(plan.track, len(test_index), n_slots, wanted)
    return split_images(test_index, order_rank, n)


def collect(ray, units: list[Unit], folder: RunFolder, cfg, timeout_s: float) -> None:
    """Write every shard that finished since the last call (so a crash loses none)."""
    owner = {ref: (u, k) for u in units for k, ref in u.tasks.items() if k not in u.records}
    if not owner:
        time.sleep(timeout_s)
        return
    ready, _ = ray.wait(list(owner), num_returns=len(owner), timeout=timeout_s)
    for ref in ready:
        unit, k = owner[ref]
        try:
            result = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - a task lost for good is a failed shard
            result = {"meta": None, "predictions": None, "files": {}, "node": None,
                      "proc": {}, "error": f"Ray task failed: {type(exc).__name__}: "
                                           f"{str(exc).splitlines()[0] if str(exc) else ''}"}
        unit.records[k] = store_shard(folder, unit, k, result, cfg)


def store_shard(folder: RunFolder, unit: Unit, k: int, result: dict, cfg) -> dict:
    from suite.runner import worker_error

    backend_id = unit.plan.backend_id
    meta, proc = result.get("meta"), result.get("proc") or {}
    error = result.get("error") or worker_error(bool(proc.get("timed_out")), proc.get("returncode"),
                                                meta, cfg.timeout_s)
    record = {**(meta or {"backend_id": backend_id, "backend": unit.plan.name}),
              "shard": k, "of": len(unit.shards), "test_index": unit.shards[k],
              "node": result.get("node"), "started_at": result.get("started_at"),
              "finished_at": result.get("finished_at"), "wall_s": proc.get("wall_s"),
              "peak_rss": proc.get("peak_rss"), "peak_rss_max_process": proc.get("peak_rss_max_process"),
              "status": "failed" if error else "ok", "error": error}
    if error and result.get("log_tail"):
        record["log_tail"] = result["log_tail"]
    for rel, data in (result.get("files") or {}).items():
        target = folder.root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(target, data)
    write_shard(folder, backend_id, k, record, result.get("predictions") if not error else None)
    return record


def finish(unit: Unit, state, run_dir: Path, cfg, writer, console, n_slots: int) -> None:
    """Merge the shards of a finished configuration into its part and score it."""
    from suite import runner

    plan, folder = unit.plan, RunFolder(run_dir)
    records = [unit.records[k] for k in range(len(unit.shards))]
    entry = state.backend(plan.backend_id)
    entry["shards"] = [shard_summary(r) for r in records]
    unit.done = True
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        r = failed[0]
        where = f"shard {r['shard']} of {r['of']}" + (f" on node {r['node']['node_ip']}" if r.get("node") else "")
        runner.record_failure(plan, state, writer, console, f"{r['error']} ({where})")
        return
    part = merge_parts(records)
    write_parquet_atomic(merge_predictions(folder, plan.backend_id, len(records)),
                         folder.part_predictions(plan.backend_id))
    write_json_atomic(folder.part_meta(plan.backend_id), part)
    starts = [r["started_at"] for r in records]
    ends = [r["finished_at"] for r in records]
    proc = {"wall_s": max(ends) - min(starts),
            "peak_rss": max(r.get("peak_rss") or 0 for r in records),
            "peak_rss_max_process": max(r.get("peak_rss_max_process") or 0 for r in records)}
    entry["executor_wall_s"] = proc["wall_s"]
    runner.score_part(plan, state, run_dir, cfg, part, proc, writer, console,
                      annotate=lambda rows: annotate_rows(rows, len(records), len(
                          {(r.get("node") or {}).get("node_id") for r in records})))


WALL_NOTE = ("Ray executor: first shard started to last shard finished ({k} shards on {n} nodes, "
             "node clocks)")
SUMMED = {"online_time": "sum of the {k} shards' predict time (they ran in parallel): compute, not wall time",
          "throughput": "images / summed predict time of {k} parallel shards: one node's rate, not the run's",
          "peak_rss": "largest of {k} shards (one node's worker tree)",
          "peak_rss_max_process": "largest of {k} shards",
          "setup_time": "slowest of {k} shards' setups (run in parallel)",
          "bytes_sent": "sum over {k} shards", "bytes_received": "sum over {k} shards",
          "setup_bytes": "sum over {k} shards (each shard sets up its own parties)"}


def annotate_rows(rows: list, k: int, n_nodes: int) -> list:
    """Say what a sharded configuration's cost rows mean (only when it had >1 shard)."""
    if k <= 1:
        return rows
    for row in rows:
        if row.metric == "wall_time":
            row.note = WALL_NOTE.format(k=k, n=n_nodes)
        elif row.metric in SUMMED and not row.note:
            row.note = SUMMED[row.metric].format(k=k)
    return rows


class ProgressBoardView:
    """Shards done, images done of total, rate and time left per running configuration:
    a live line each on a terminal, else a plain line at most every 30 s."""

    def __init__(self, console) -> None:
        self.console, self.live, self.tasks, self.last_plain = console, None, {}, None

    def __enter__(self) -> "ProgressBoardView":
        self.resume()
        return self

    def __exit__(self, *exc) -> None:
        self.pause()

    def resume(self) -> None:
        if self.console.is_terminal and self.live is None:
            from rich.progress import Progress

            self.live, self.tasks = Progress(console=self.console, transient=True), {}
            self.live.start()

    def pause(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    def show(self, units: list[Unit], board: dict[str, tuple[int, int, float]], final: bool = False) -> None:
        from suite.runner import describe_rate

        lines = []
        for u in units:
            if not u.submitted or u.done or not u.shards or (u.finished() and not final):
                continue
            keys = [f"{u.plan.backend_id}#{k}" for k in range(len(u.shards))]
            seen = [board[key] for key in keys if key in board]
            kept = sum(len(u.shards[k]) for k in u.records if k not in u.tasks)
            done = kept + sum(d for d, _, _ in seen)
            total = sum(len(s) for s in u.shards)
            if not seen and not u.records:
                continue
            elapsed = time.time() - min(t for _, _, t in seen) if seen else 0.0
            text = f"shards {len(u.records)}/{len(u.shards)} done, " + describe_rate(
                done, total, done - kept, elapsed)
            lines.append((u.plan.backend_id, text, done, total))
        if self.live is not None:
            for bid, text, done, total in lines:
                if bid not in self.tasks:
                    self.tasks[bid] = self.live.add_task(escape(bid), total=total)
                self.live.update(self.tasks[bid], completed=done, total=total,
                                 description=f"{escape(bid)}: {text}")
        elif lines and (final or self.last_plain is None
                        or time.monotonic() - self.last_plain >= PLAIN_PROGRESS_EVERY_S):
            self.last_plain = time.monotonic()
            for bid, text, _, _ in lines:
                self.console.print(f"  {escape(bid)}: {text}")
