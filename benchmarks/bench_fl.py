"""asv benchmarks for the FL backend's building blocks (`asv run --bench bench_fl`).

Engine runs are measured end to end by `python -m suite run --backends fl` (the harness
owns that clock); these isolate the parts: one site's local epoch, a round's traffic
against the floor, the round cost of each engine, Ray start-up, and the gradient-inversion
step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _site(n: int = 300, size: int = 64):
    from suite.data.synthetic import generate_synthetic

    data = generate_synthetic(n_train_per_site=n, n_test_per_site=0, size=size, seed=0, n_sites=1)
    return data.split("train")


def _job(**kw):
    from backends.fl.app import FLJob
    from suite.models import SMALL_DENSENET

    return FLJob(out_dir="", data_dir="", sites=["site-1"], n_labels=5,
                 architecture=SMALL_DENSENET, threads=1, **kw)


class LocalEpoch:
    """One site's local epoch (300 images, the recipe's batch of 64), FedAvg vs FedProx."""

    params = ([32, 64], [0.0, 0.1])
    param_names = ["resolution", "proximal_mu"]
    timeout = 300

    def setup(self, resolution, mu):
        from backends.fl.app import initial_model, set_threads
        from backends.audits.gradient_inversion import downsample
        from suite.models import SMALL_DENSENET

        set_threads(1)
        site = _site()
        self.data = site.subset(np.arange(len(site)))
        self.data.images = downsample(site.images, resolution)
        self.init = initial_model(SMALL_DENSENET, 5, resolution, 0)
        self.job = _job()

    def time_local_epoch(self, resolution, mu):
        import copy

        from backends.fl.app import train_local

        train_local(copy.deepcopy(self.init), self.data, 1, self.job, seed=0, proximal_mu=mu)


class MessageBytes:
    """Serialised size of one round's train messages (Flower's object tree: the model down,
    the update up) against the floor of two raw model copies; target <= 1.05."""

    def setup(self):
        from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.task_identity import TaskIdentity

        from backends.fl.app import MODEL_KEY, flatten, get_arrays, initial_model
        from suite.models import SMALL_DENSENET

        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
        arrays = get_arrays(initial_model(SMALL_DENSENET, 5, 64, 0))
        self.model_bytes = sum(a.nbytes for a in arrays.values())
        record = ArrayRecord({MODEL_KEY: Array(flatten(arrays))})
        self.msg = Message(RecordDict({"arrays": record, "config": ConfigRecord({"server-round": 1})}),
                           dst_node_id=7, message_type="train")
        self.msg.metadata.__dict__["_message_id"] = "m1"
        metrics = MetricRecord({"num-examples": 300, "unit-weight": 1, "train-loss": 0.5,
                                "partition-id": 0})
        self.reply = Message(RecordDict({"arrays": ArrayRecord({MODEL_KEY: Array(flatten(arrays))}),
                                         "metrics": metrics}), reply_to=self.msg)

    def track_train_round_vs_floor(self):
        from backends.fl.app import message_bytes

        return (message_bytes(self.msg) + message_bytes(self.reply)) / (2 * self.model_bytes)

    track_train_round_vs_floor.unit = "ratio"

    def track_train_message_overhead(self):
        from backends.fl.app import message_bytes

        return message_bytes(self.msg) / self.model_bytes

    track_train_message_overhead.unit = "ratio"

    def time_serialise_train_message(self):
        from backends.fl.app import message_bytes

        message_bytes(self.msg)


class EngineRound:
    """Seconds per federated round on each engine, the same configuration for both (7 sites
    x 40 images at 32 px, 4 rounds, 1 thread, FedBN); target: deployment <= 2x simulation.

    `train`: the training exchange (configure_train -> aggregate_train), mean of rounds 2..4;
    `whole`: one whole round, training and federated evaluation (configure_train of round r
    -> configure_train of round r + 1), mean of rounds 2 -> 3 and 3 -> 4. Both engines run
    the same app, in which round r's evaluation travels in round r + 1's train message
    (backends.fl.app.carries_evaluation), so a round is one exchange on either. Round 1
    (actor / site-runner warm-up) is left out; engine start-up is its own row. The
    deployment engine's SuperNodes run with the labelled patches of backends/fl/supernode.py
    (shortened idle poll, site runner in-process; Flower 1.42 has no setting for either)."""

    params = (["simulation", "deployment"], ["train", "whole"])
    param_names = ["engine", "span"]
    timeout = 900
    number = 1
    repeat = 1

    def setup_cache(self):
        out = {}
        for engine in self.params[0]:
            backend, _, _ = _engine_run(engine, rounds=4)
            rounds = backend.summary["rounds"]
            out[(engine, "train")] = float(np.mean([r["finished"] - r["started"] for r in rounds[1:]]))
            out[(engine, "whole")] = float(np.mean([b["started"] - a["started"]
                                                    for a, b in zip(rounds[1:], rounds[2:])]))
            out[(engine, "startup")] = float(backend.summary.get("engine_startup_s") or np.nan)
        return out

    def track_round_seconds(self, cache, engine, span):
        return cache[(engine, span)]

    track_round_seconds.unit = "seconds"

    def track_round_vs_simulation(self, cache, engine, span):
        return cache[(engine, span)] / cache[("simulation", span)]

    track_round_vs_simulation.unit = "ratio"

    def track_startup_seconds(self, cache, engine, span):
        """Engine start-up (processes up and registered), apart from the rounds; once per engine."""
        if span != "whole":
            raise NotImplementedError("start-up is one figure per engine (span=whole)")
        return cache[(engine, "startup")]

    track_startup_seconds.unit = "seconds"


def _engine_run(engine: str, rounds: int, keep: Path | None = None, sites: int = 7):
    """One federation through the harness in EngineRound's configuration (`sites` sites x 40
    images at 32 px, FedBN, 1 thread, from scratch): (backend, seconds of the fit phase,
    work folder or None). The work folder is kept under `keep` (site-runner logs)."""
    import shutil
    import tempfile

    from backends.fl.backend import FLBackend, FLOptions
    from suite.backend import BackendContext
    from suite.data.synthetic import generate_synthetic
    from suite.harness import measure
    from suite.meter import CommMeter
    from suite.models import random_small_densenet

    data = generate_synthetic(n_train_per_site=40, n_test_per_site=4, size=32, seed=0, n_sites=sites)
    model = random_small_densenet(data.label_names, resolution=32, seed=0)
    backend = FLBackend(FLOptions(engine=engine, rounds=rounds, resolution=32, start="scratch"))
    work = Path(tempfile.mkdtemp(prefix=f"bench-fl-{engine}-", dir=keep))
    try:
        ctx = BackendContext(model=model, meter=CommMeter(), workdir=work, seed=0, threads=1)
        _, timings, _ = measure(backend, ctx, data.split("test"), data.split("train"), progress=False)
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return backend, timings.fit_s, (work if keep is not None else None)


def round_profile(summary: dict, logs: Path | None = None) -> dict:
    """Where a federation's wall time goes, from the ServerApp's summary (`exchanges`: each
    push-and-poll's start, push return and reply arrivals; `rounds`) and, for the deployment
    engine, the site runners' per-message wall clocks (`logs/supernode-k.log`, where the
    runner is a thread of the SuperNode, or `logs/site-runner-k.log`: acquired, pulled,
    computed, pushed). Seconds; medians over the sites, means over the exchanges after the
    first two (round 1 warms up)."""
    import json
    import re

    ex = summary.get("exchanges") or []
    sites = []
    if logs is not None:
        for log in sorted(logs.glob("site-runner-*.log")) + sorted(logs.glob("supernode-*.log")):
            served = [json.loads(m) for m in re.findall(r"served message \d+ (\{.*\})",
                                                        log.read_text(errors="replace"))]
            if served:
                sites.append(served)
    rows = []
    for k, e in enumerate(ex):
        row = {"round": e["round"], "kind": e["kind"], "push": e["pushed"] - e["started"],
               "exchange": (max(e["replies"]) if e["replies"] else e["pushed"]) - e["started"]}
        if k + 1 < len(ex):
            row["server_between"] = ex[k + 1]["started"] - (max(e["replies"]) if e["replies"] else e["pushed"])
        tasks = [s[k] for s in sites if len(s) > k]
        if tasks:
            med = lambda xs: float(np.median(xs))  # noqa: E731
            row["delivery"] = med([t["acquired"] - e["pushed"] for t in tasks])
            row["pull_input"] = med([t["pulled"] - t["acquired"] for t in tasks])
            row["compute"] = med([t["computed"] - t["pulled"] for t in tasks])
            row["compute_max"] = max(t["computed"] - t["pulled"] for t in tasks)
            row["push_reply"] = med([t["pushed"] - t["computed"] for t in tasks])
            row["return"] = (max(e["replies"]) if e["replies"] else e["pushed"]) - max(t["pushed"] for t in tasks)
        rows.append(row)
    steady = rows[2:] or rows
    keys = sorted({k for r in steady for k in r if k not in ("round", "kind")})
    mean = {k: float(np.mean([r[k] for r in steady if k in r])) for k in keys}
    rounds = summary.get("rounds") or []
    per_round = [b["started"] - a["started"] for a, b in zip(rounds, rounds[1:])]
    cpu: dict[str, float] = {}
    if logs is not None and (logs / "cpu-seconds.json").exists():
        for name, sec in json.loads((logs / "cpu-seconds.json").read_text()).items():
            kind = re.sub(r"-\d+$", "", name)            # supernode-3 -> supernode
            cpu[kind] = cpu.get(kind, 0.0) + sec
    return {"exchanges": rows, "steady_mean": mean, "cpu_seconds": cpu,
            "round_seconds": per_round, "server_run": summary["finished"] - summary["server_started"]}


class RayStartup:
    """What the Simulation Engine pays before round 1 (actors start lazily after this)."""

    timeout = 180
    number = 1
    repeat = 3

    def time_ray_init_shutdown(self):
        import ray

        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False, configure_logging=False)
        ray.shutdown()


class InversionStep:
    """Cost of the audit: 10 attack steps on the small DenseNet and on the control CNN."""

    params = ["densenet", "control"]
    param_names = ["target"]
    timeout = 300

    def setup(self, target):
        from backends.fl.app import initial_model, set_threads
        from backends.audits.gradient_inversion import control_cnn, control_forward
        from suite.models import SMALL_DENSENET

        set_threads(1)
        site = _site(n=2)
        self.batches = [(site.images, site.labels)]
        if target == "densenet":
            self.net, self.fwd = initial_model(SMALL_DENSENET, 5, 32, 0), None
        else:
            self.net, self.fwd = control_cnn(5), control_forward

    def time_ten_steps(self, target):
        from backends.audits.gradient_inversion import AttackConfig, run_audit

        run_audit(self.net, self.batches, AttackConfig(images=2, steps=10), lr=2e-3, clip=1.0,
                  epsilon=10.0, delta=1e-5, views=("update",), forward=self.fwd)


def _print_profile(rounds: int = 4, engines: tuple[str, ...] = ("simulation", "deployment")) -> None:
    """`bench_fl.py --profile`: both engines, the same configuration, where the time goes."""
    import json
    import tempfile

    keep = Path(tempfile.mkdtemp(prefix="fl-profile-"))
    out = {}
    for engine in engines:
        backend, fit_s, work = _engine_run(engine, rounds, keep=keep)
        logs = next(work.rglob("logs"), None) if engine == "deployment" else None
        prof = round_profile(backend.summary, logs)
        prof.update(fit_s=fit_s, startup_s=backend.summary.get("engine_startup_s"))
        out[engine] = prof
        print(engine, json.dumps({k: v for k, v in prof.items() if k != "exchanges"}, indent=1))
        for r in prof["exchanges"]:
            print("  ", json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}))
    if set(out) != {"simulation", "deployment"}:
        return
    sim, dep = out["simulation"], out["deployment"]
    whole = [np.mean(p["round_seconds"][1:] or p["round_seconds"]) for p in (sim, dep)]
    print(f"whole round (rounds 2..{rounds}): simulation {whole[0]:.2f} s, deployment {whole[1]:.2f} s, "
          f"ratio {whole[1] / whole[0]:.2f}; logs in {keep}")


if __name__ == "__main__":          # standalone: .venv/bin/python benchmarks/bench_fl.py
    import sys
    import time

    if "--profile" in sys.argv:      # --profile [rounds]
        at = sys.argv.index("--profile")
        args = sys.argv[at + 1:]      # [rounds] [engine ...]
        _print_profile(int(args[0]) if args else 4, tuple(args[1:]) or ("simulation", "deployment"))
        sys.exit(0)

    m = MessageBytes()
    m.setup()
    print(f"train message / model bytes: {m.track_train_message_overhead():.3f}")
    print(f"train round (down + up) / floor: {m.track_train_round_vs_floor():.3f}")
    for res in (32, 64):
        b = LocalEpoch()
        b.setup(res, 0.0)
        t = time.perf_counter()
        b.time_local_epoch(res, 0.0)
        print(f"local epoch, 300 images at {res}px, 1 thread: {time.perf_counter() - t:.2f} s")
    r = RayStartup()
    t = time.perf_counter()
    r.time_ray_init_shutdown()
    print(f"ray.init + shutdown: {time.perf_counter() - t:.2f} s")
    for target in InversionStep.params:
        s = InversionStep()
        s.setup(target)
        t = time.perf_counter()
        s.time_ten_steps(target)
        print(f"10 inversion steps on the {target}: {time.perf_counter() - t:.2f} s")
