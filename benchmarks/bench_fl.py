"""asv benchmarks for the FL backend's building blocks (`asv run --bench bench_fl`).

Engine runs are measured end to end by `python -m suite run --backends fl` (the harness
owns that clock); these isolate the parts: one site's local epoch, a round's traffic
against the floor, the round cost of each engine, Ray start-up, and the gradient-inversion
step.
"""

from __future__ import annotations

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
    -> configure_train of round r + 1), mean of rounds 2 -> 3 and 3 -> 4. Round 1 (actor /
    site-runner warm-up) is left out; engine start-up is its own row. The deployment
    engine's SuperNodes run with the shortened idle poll of backends/fl/supernode.py (a
    monkeypatch of Flower: 1.42 has no setting for its fixed 3 s poll)."""

    params = (["simulation", "deployment"], ["train", "whole"])
    param_names = ["engine", "span"]
    timeout = 900
    number = 1
    repeat = 1

    def setup_cache(self):
        import shutil
        import tempfile
        from pathlib import Path

        from backends.fl.backend import FLBackend, FLOptions
        from suite.backend import BackendContext
        from suite.data.synthetic import generate_synthetic
        from suite.harness import measure
        from suite.meter import CommMeter
        from suite.models import random_small_densenet

        data = generate_synthetic(n_train_per_site=40, n_test_per_site=4, size=32, seed=0)
        model = random_small_densenet(data.label_names, resolution=32, seed=0)
        out = {}
        for engine in self.params[0]:
            backend = FLBackend(FLOptions(engine=engine, rounds=4, resolution=32, start="scratch"))
            work = Path(tempfile.mkdtemp(prefix=f"bench-fl-{engine}-"))
            try:
                ctx = BackendContext(model=model, meter=CommMeter(), workdir=work, seed=0, threads=1)
                measure(backend, ctx, data.split("test"), data.split("train"), progress=False)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            rounds = backend.summary["rounds"]
            out[(engine, "train")] = float(np.mean([r["finished"] - r["started"] for r in rounds[1:]]))
            out[(engine, "whole")] = float(np.mean([b["started"] - a["started"]
                                                    for a, b in zip(rounds[1:], rounds[2:])]))
        return out

    def track_round_seconds(self, cache, engine, span):
        return cache[(engine, span)]

    track_round_seconds.unit = "seconds"

    def track_round_vs_simulation(self, cache, engine, span):
        return cache[(engine, span)] / cache[("simulation", span)]

    track_round_vs_simulation.unit = "ratio"


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


if __name__ == "__main__":          # standalone: .venv/bin/python benchmarks/bench_fl.py
    import time

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
