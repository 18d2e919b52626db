"""The federated-learning backend: engines, controls, faults, traffic, hybrids and the audit.

Engine tests run the real Flower engines on the tiny synthetic set (7 sites x 12 images at
32 px). Strategy-level tests run the same ServerApp and ClientApps through an in-process
Grid (`InlineGrid`), which delivers each message to the right site's ClientApp directly:
the apps, strategies, wrappers and mods are Flower's, only the transport is replaced.
"""

from __future__ import annotations

import json
from importlib.util import find_spec
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import psutil
import pytest

pytestmark = pytest.mark.skipif(find_spec("flwr") is None or find_spec("ray") is None,
                                reason="fl backend needs the [fl] extra")


# -------------------------------------------------------------------------------------------
# helpers
# -------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _one_thread():
    """These tests train on one thread (two spin-waiting OpenMP threads crawl on a loaded
    host); the process's setting is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ctx(tiny_model, workdir: Path, threads: int = 1):
    from suite.backend import BackendContext
    from suite.meter import CommMeter

    workdir.mkdir(parents=True, exist_ok=True)
    return BackendContext(model=tiny_model, meter=CommMeter(), workdir=workdir, seed=0,
                          threads=threads, quick=True)


def _backend(**options):
    from backends.fl.backend import FLBackend, FLOptions

    return FLBackend(FLOptions.parse(options, "fl"))


def _rows(backend, metric, round=None):
    return [r for r in backend.extra_rows() if r["metric"] == metric
            and (round is None or r.get("round") == round)]


def _flower_processes():
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if any(name in cmd for name in ("flower-superlink", "flower-supernode", "flower-superexec",
                                        "flwr-serverapp", "flwr-clientapp", "raylet", "gcs_server",
                                        "backends.fl.supernode", "backends.fl.site_runner")):
            out.append(p)
    return out


def _mine(procs, workdir: Path):
    """Flower processes that belong to this test (their FLWR_HOME is under workdir)."""
    mine = []
    for p in procs:
        try:
            if str(workdir) in p.environ().get("FLWR_HOME", ""):
                mine.append(p)
        except psutil.Error:
            pass
    return mine


class InlineGrid:
    """A Grid that hands each message straight to the destination site's ClientApp.

    Node ids 101.., one Context per node (SecAgg+ keeps per-node state there); each site
    gets its own copy of a message, as after transport (Flower's mods mutate what they
    receive); a ClientApp exception becomes an error reply, as the real engines do.
    """

    def __init__(self, client_app, n_nodes: int) -> None:
        from flwr.app import Context, RecordDict
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.task_identity import TaskIdentity

        # what the engines set before a ServerApp runs (messages are stamped with it)
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
        self.run = SimpleNamespace(run_id=1)
        self.app = client_app
        self.contexts = {101 + k: Context(run_id=1, node_id=101 + k,
                                          node_config={"partition-id": k, "num-partitions": n_nodes},
                                          state=RecordDict(), run_config={})
                         for k in range(n_nodes)}

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Error, Message

        replies = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{id(msg)}-{i}"
            delivered = _transported(msg)
            try:
                replies.append(self.app(delivered, self.contexts[msg.metadata.dst_node_id]))
            except Exception as exc:  # noqa: BLE001 - a crashed site
                replies.append(Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg))
        return replies


def _transported(msg):
    """The message as the receiver gets it: deflated to Flower's wire objects and inflated."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    contents = {k: o.deflate() for k, o in get_all_nested_objects(msg).items()}
    out = inflate_object_from_contents(msg.object_id, contents)
    out.metadata.__dict__["_message_id"] = msg.metadata.message_id
    return out


def _inline_job(tmp_path: Path, tiny_data, tiny_model, **overrides):
    """Write sites + initial model for an in-process federation; returns the job."""
    from backends.fl.backend import FLOptions, partition_clients
    from backends.fl.app import INITIAL, FLJob, get_arrays, initial_model, save_site

    train = tiny_data.split("train")
    clients = partition_clients(train, FLOptions(), 0)
    out = tmp_path / "server"
    out.mkdir(parents=True)
    for site, idx in clients.items():
        save_site(tmp_path / "sites", site, train.images[idx], train.labels[idx])
    init = initial_model(tiny_model.architecture, len(tiny_data.label_names), 32, 0)
    np.savez(out / INITIAL, **get_arrays(init))
    fields = dict(out_dir=str(out), data_dir=str(tmp_path / "sites"), sites=list(clients),
                  n_labels=len(tiny_data.label_names), architecture=tiny_model.architecture,
                  rounds=1, local_epochs=1, round_eval=False, threads=1,
                  max_site_examples=max(len(i) for i in clients.values()))
    fields.update(overrides)
    return FLJob(**fields)


def _run_inline(job):
    from flwr.app import Context, RecordDict

    from backends.fl.app import (FINAL, SUMMARY, make_client_app, make_secagg_client_app,
                                 server_main)

    app = make_secagg_client_app(job) if job.privacy == "secagg" else make_client_app(job)
    grid = InlineGrid(app, len(job.sites))
    server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}), job)
    out = Path(job.out_dir)
    with np.load(out / FINAL) as z:
        final = {k: z[k] for k in z.files}
    return json.loads((out / SUMMARY).read_text()), final


def _distance(a, b):
    return float(np.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a if "running" not in k)))


# -------------------------------------------------------------------------------------------
# configurations, threat models, partitions (fast)
# -------------------------------------------------------------------------------------------

def test_expand_yields_federated_and_local_with_centralised_reference():
    from backends.fl.backend import FLBackend, FLOptions

    configs = FLBackend.expand(FLOptions())
    assert [c.config_label() for c in configs] == ["fl", "fl[mode=local]"]
    ref = configs[0].reference()
    assert ref.config_label() == "fl[mode=centralised]"
    assert configs[1].reference().config_label() == "fl[mode=centralised]"
    assert ref.reference() is None
    # variants share one control; the control keeps the budget
    dp = FLBackend(FLOptions(privacy="dp", rounds=4))
    assert dp.reference().config_label() == "fl[mode=centralised,rounds=4]"
    assert [c.config_label() for c in FLBackend.expand(FLOptions(privacy="secagg"))] == ["fl[privacy=secagg]"]


def test_bad_options_are_rejected_by_name():
    from suite.errors import SuiteError

    with pytest.raises(SuiteError, match="strategy"):
        _backend(strategy="fedsgd")
    with pytest.raises(SuiteError, match="no option 'round'"):
        _backend(round=3)


@pytest.mark.parametrize("privacy,kind", [("none", "data_locality"), ("dp", "differential_privacy"),
                                          ("ldp", "differential_privacy"), ("secagg", "cryptographic")])
def test_threat_models_are_complete(privacy, kind):
    tm = _backend(privacy=privacy).threat_model()
    assert tm.missing_fields() == []
    assert tm.guarantee_kind == kind
    assert "input_images" in tm.protects
    if privacy == "dp":
        assert "epsilon=" in tm.guarantee
    assert _backend(mode="centralised").threat_model().guarantee_kind == "none"
    assert _backend(mode="local").threat_model().guarantee_kind == "data_locality"


def test_dirichlet_partition_covers_every_image_once(tiny_data):
    from backends.fl.backend import FLOptions, partition_clients

    train = tiny_data.split("train")
    parts = partition_clients(train, FLOptions(partition="dirichlet", n_clients=4, alpha=0.3), 0)
    rows = np.concatenate(list(parts.values()))
    assert len(parts) == 4 and sorted(rows.tolist()) == list(range(len(train)))
    assert min(len(p) for p in parts.values()) >= 2
    by_site = partition_clients(train, FLOptions(), 0)
    assert list(by_site) == [f"site-{k}" for k in range(1, 8)]


# -------------------------------------------------------------------------------------------
# strategies, DP, SecAgg+, faults: the real apps over an in-process Grid
# -------------------------------------------------------------------------------------------

def test_fedprox_differs_from_fedavg(tmp_path, tiny_data, tiny_model):
    from backends.fl.app import INITIAL

    # 3 local steps: the proximal gradient is zero on the first step (w = w_global)
    avg, avg_final = _run_inline(_inline_job(tmp_path / "avg", tiny_data, tiny_model, local_epochs=3))
    prox, prox_final = _run_inline(_inline_job(tmp_path / "prox", tiny_data, tiny_model,
                                               local_epochs=3, strategy="fedprox", proximal_mu=5.0))
    with np.load(tmp_path / "avg" / "server" / INITIAL) as z:
        init = {k: z[k] for k in z.files}
    assert avg["rounds"][0]["aggregated"] and prox["rounds"][0]["aggregated"]
    assert _distance(avg_final, prox_final) > 0
    # the proximal term pulls every site, hence the aggregate, towards the global model
    assert _distance(prox_final, init) < _distance(avg_final, init)


def test_fedbn_keeps_each_sites_batchnorm_at_the_site(tmp_path, tiny_data, tiny_model):
    """bn=local (FedBN): a site computes with its own BatchNorm layers, never the server's;
    control: bn=shared loads everything from the server and keeps nothing local."""
    from backends.fl.app import (batchnorm_keys, load_local_layers, local_layers_path,
                                 site_model_arrays)

    job = _inline_job(tmp_path / "bn", tiny_data, tiny_model, rounds=2, bn="local")
    summary, final = _run_inline(job)
    keys = batchnorm_keys(job)
    assert keys and all(k in final for k in keys) and any(k.endswith("running_var") for k in keys)
    own = {site: load_local_layers(local_layers_path(job.data_dir, site)) for site in job.sites}
    assert all(v is not None and set(v) == set(keys) for v in own.values())
    var = next(k for k in keys if k.endswith("running_mean"))
    assert not np.allclose(own["site-1"][var], own["site-7"][var])       # each site its own
    # the server still averages what the sites upload (their BatchNorm included) ...
    n = np.array([r for r in (len(np.load(f"{job.data_dir}/{s}.npz")["images"]) for s in job.sites)], float)
    mean = sum(w * own[s][var] for w, s in zip(n / n.sum(), job.sites))
    assert np.allclose(final[var], mean, atol=1e-5)
    # ... but a site never computes with it: global weights + its own BatchNorm layers
    mixed = site_model_arrays(job, "site-1", final)
    assert np.array_equal(mixed[var], own["site-1"][var])
    other = next(k for k in final if k not in keys)
    assert np.array_equal(mixed[other], final[other])
    # control: shared BatchNorm keeps nothing at the site and computes with the server's
    shared = _inline_job(tmp_path / "shared", tiny_data, tiny_model, rounds=1, bn="shared")
    _, final_shared = _run_inline(shared)
    assert not any(local_layers_path(shared.data_dir, s).exists() for s in shared.sites)
    assert site_model_arrays(shared, "site-1", final_shared) is final_shared


def test_fedbn_is_refused_where_a_privacy_guarantee_covers_the_global_model():
    from suite.errors import SuiteError

    with pytest.raises(SuiteError, match="bn=local"):
        _backend(privacy="dp", bn="local")
    assert _backend(privacy="dp").batchnorm() == "shared"
    assert _backend().batchnorm() == "local"
    assert _backend(mode="centralised").batchnorm() == "shared"


def test_dropout_round_completes_with_the_remaining_sites(tmp_path, tiny_data, tiny_model):
    summary, _ = _run_inline(_inline_job(tmp_path, tiny_data, tiny_model, rounds=2,
                                         drop_site="site-3", drop_round=2))
    r1, r2 = summary["rounds"]
    assert r1["replies"] == 7 and r1["failures"] == 0
    assert r2["replies"] == 6 and r2["failures"] == 1 and r2["aggregated"]
    from backends.fl.backend import FLOptions, federation_rows

    rows = federation_rows(summary, FLOptions(rounds=2))
    dropped = {r.get("round"): r for r in rows if r["metric"] == "dropped_clients"}
    assert dropped[2]["value"] == 1 and "site-3" in dropped[2]["note"]
    assert dropped[1]["value"] == 0 and dropped[None]["value"] == 1


def test_too_few_sites_leave_the_round_unaggregated(tmp_path, tiny_data, tiny_model):
    summary, final = _run_inline(_inline_job(tmp_path, tiny_data, tiny_model, min_clients=7,
                                             drop_site="site-1", drop_round=1))
    assert not summary["rounds"][0]["aggregated"] and "min_clients" in summary["rounds"][0]["note"]
    from backends.fl.app import INITIAL

    with np.load(tmp_path / "server" / INITIAL) as z:
        assert _distance({k: z[k] for k in z.files}, final) == 0


@pytest.mark.parametrize("bn", ["local", "shared"])
def test_evaluation_carried_in_the_next_train_message_gives_the_same_rows(tmp_path, tiny_data,
                                                                           tiny_model, monkeypatch, bn):
    """Round r's federated evaluation travels in round r + 1's train message: the same
    per-round evaluation, training and model as separate evaluate exchanges, with one
    evaluate exchange (the last round's) instead of one per round. Control: with the carry
    turned off every round has its own evaluate exchange. Equal to float32 rounding: the
    CPU kernels' results can move by an ulp once other work ran in the process first
    (two runs of the same schedule are bitwise equal; the schedules differ by 1e-8)."""
    import backends.fl.app as fl_app

    job = dict(rounds=3, round_eval=True, bn=bn)
    carried, carried_final = _run_inline(_inline_job(tmp_path / "a", tiny_data, tiny_model, **job))
    monkeypatch.setattr(fl_app, "carries_evaluation", lambda j: False)
    separate, separate_final = _run_inline(_inline_job(tmp_path / "b", tiny_data, tiny_model, **job))

    def evaluate_rounds(summary):
        return sorted({t["round"] for t in summary["traffic"] if t["kind"] == "evaluate"})

    assert evaluate_rounds(separate) == [1, 2, 3]          # control: one exchange per round
    assert evaluate_rounds(carried) == [3]
    for a, b in zip(carried["rounds"], separate["rounds"], strict=True):
        assert set(a["evaluate"]) == set(b["evaluate"]) >= {"eval-loss", "eval-auroc"}
        for k in a["evaluate"]:
            assert a["evaluate"][k] == pytest.approx(b["evaluate"][k], rel=1e-6), k
        assert a["train"] == pytest.approx(b["train"], rel=1e-6)
    norm = _distance(separate_final, {k: 0 * v for k, v in separate_final.items()})
    assert _distance(carried_final, separate_final) < 1e-6 * norm


def test_evaluation_is_not_carried_where_the_schedules_differ():
    from backends.fl.app import FLJob, carries_evaluation

    base = dict(out_dir="", data_dir="", sites=["a", "b"], n_labels=1, architecture={})
    assert carries_evaluation(FLJob(**base))
    assert not carries_evaluation(FLJob(**base, fraction=0.5))        # evaluation asks all sites
    assert not carries_evaluation(FLJob(**base, drop_site="a", drop_round=2))
    assert not carries_evaluation(FLJob(**base, privacy="secagg"))    # Flower's legacy schedule
    assert not carries_evaluation(FLJob(**base, round_eval=False))


def test_central_dp_wraps_fedavg_and_is_accounted(tmp_path, tiny_data, tiny_model):
    plain, plain_final = _run_inline(_inline_job(tmp_path / "a", tiny_data, tiny_model))
    dp, dp_final = _run_inline(_inline_job(tmp_path / "b", tiny_data, tiny_model, privacy="dp",
                                           clip=0.5, noise_multiplier=1.0, rounds=1))
    assert dp["rounds"][0]["aggregated"]
    assert dp["dp_epsilon"] > 0 and dp["dp_releases"] == 1
    assert _distance(plain_final, dp_final) > 0


def test_secagg_aggregate_matches_plain_fedavg(tmp_path, tiny_data, tiny_model):
    """SecAgg+ (masking, secret sharing, fixed point) gives the plain FedAvg model back."""
    plain, plain_final = _run_inline(_inline_job(tmp_path / "a", tiny_data, tiny_model))
    sec, sec_final = _run_inline(_inline_job(tmp_path / "b", tiny_data, tiny_model, privacy="secagg"))
    assert sec["rounds"][0]["aggregated"]
    rel = _distance(plain_final, sec_final) / _distance(plain_final, {k: 0 * v for k, v in plain_final.items()})
    assert rel < 1e-4
    # the protocol's extra stages cost traffic: more than the plain round
    train_bytes = lambda s: sum(t["down"] + t["up"] for t in s["traffic"] if t["kind"].startswith("train"))  # noqa: E731
    assert train_bytes(sec) > train_bytes(plain)


# -------------------------------------------------------------------------------------------
# the real engines
# -------------------------------------------------------------------------------------------

@pytest.mark.timeout(300)
def test_simulation_engine_end_to_end(tiny_data, shared_run):
    # the run test_conformance.py's fl[resolution=32,rounds=2] asserts on too (tests/shared_runs.py)
    run = shared_run(_backend(rounds=2, audit=False, resolution=32))
    backend, ctx, test, probs, audit = run.backend, run.ctx, run.test, run.probs, run.audit
    assert probs.shape == (len(test), len(tiny_data.label_names))
    assert np.all((probs >= 0) & (probs <= 1))
    assert audit.status == "ok" and audit.rows == []      # audit=false: nothing attacked
    # convergence curve: one row per round, the `round` qualifier, on held-out slices
    assert [r["round"] for r in _rows(backend, "round_val_auroc")] == [1, 2]
    assert "held-out" in _rows(backend, "round_val_auroc")[0]["note"]
    assert len(_rows(backend, "round_train_loss")) == 2
    assert _rows(backend, "train_budget_epochs")[0]["value"] == 2
    assert _rows(backend, "training_rounds")[0]["value"] == 2
    # traffic measured from the serialised messages, against the floor
    floor = _rows(backend, "comm_floor_bytes")[0]["value"]
    model = _rows(backend, "model_bytes")[0]["value"]
    assert floor == model * 7 * 2
    ratio = _rows(backend, "comm_ratio_vs_floor")[0]["value"]
    assert 1.0 <= ratio < 1.5
    snap = ctx.meter.snapshot()
    assert ("fit", "server") in snap and ("fit", "site-3") in snap
    server = snap[("fit", "server")]
    assert server.bytes_sent >= 2 * 7 * model and server.bytes_received >= 2 * 7 * model
    sites_sent = sum(t.bytes_sent for (ph, party), t in snap.items() if party.startswith("site-"))
    assert sites_sent == server.bytes_received
    assert _rows(backend, "engine_startup_time")[0]["value"] > 0
    # FedBN (the default): every test image was scored by its own site's model
    assert set(backend.site_nets) == set(tiny_data.site_names())
    assert _rows(backend, "local_routed_fraction")[0]["value"] == 1.0
    # Ray and every worker are gone
    import ray

    assert not ray.is_initialized()
    assert not run.leftover          # the children that outlived measure(), taken right after it


@pytest.mark.timeout(420)
def test_deployment_engine_end_to_end(tiny_data, shared_run):
    """SuperLink + one SuperNode per site as processes, `flwr run`, everything stopped.

    The run test_conformance.py's fl[engine=deployment,...] asserts on too (tests/shared_runs.py):
    all 7 tiny sites and 2 rounds, where this test alone had run 3 sites for 1 round."""
    run = shared_run(_backend(rounds=2, audit=False, engine="deployment", resolution=32))
    backend, ctx, probs, work = run.backend, run.ctx, run.probs, run.ctx.workdir
    assert probs.shape == (len(run.test), len(tiny_data.label_names))
    assert (work / "flwr-app" / "pyproject.toml").exists()
    assert _rows(backend, "dropped_clients", 1)[0]["value"] == 0
    snap = ctx.meter.snapshot()
    assert {"site-1", "site-2", "site-3", "server"} <= {party for _, party in snap}
    assert 1.0 <= _rows(backend, "comm_ratio_vs_floor")[0]["value"] < 1.5
    assert not _mine(_flower_processes(), work), "flower processes left running"
    assert not [p for p in psutil.Process().children(recursive=True)
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


# -------------------------------------------------------------------------------------------
# the privacy audit
# -------------------------------------------------------------------------------------------

def test_attack_reconstructs_better_without_protection(tmp_path, tiny_data):
    """Positive control: on a CNN that leaks, plain updates invert; LDP noise and SecAgg's
    aggregate do not; pictures are written."""
    from backends.audits.gradient_inversion import AttackConfig, control_cnn, control_forward, run_audit

    train = tiny_data.split("train")
    batches = []
    for site in tiny_data.site_names():
        idx = np.flatnonzero(train.sites == site)[:2]
        batches.append((train.images[idx], train.labels[idx]))
    results = {r.view: r for r in run_audit(
        control_cnn(len(tiny_data.label_names)), batches, AttackConfig(images=2, steps=120),
        lr=2e-3, clip=1.0, epsilon=10.0, delta=1e-5, forward=control_forward, workdir=tmp_path)}
    assert results["update"].psnr > results["update-ldp"].psnr + 5
    assert results["update"].psnr > results["baseline"].psnr + 5
    assert results["update"].ssim > results["update-ldp"].ssim + 0.3
    assert results["update"].psnr > results["aggregate"].psnr
    assert (tmp_path / "inversion-overview.png").exists()
    assert (tmp_path / "inversion-update.png").exists()


def test_audit_rows_from_the_backend(tmp_path, tiny_data, tiny_model):
    """The backend's audit emits PSNR/SSIM rows per view (few steps: shape only)."""
    from backends.fl.backend import FLBackend, FLOptions, partition_clients

    backend = FLBackend(FLOptions(audit_steps=3, audit_images=2, resolution=32))
    ctx = _ctx(tiny_model, tmp_path / "fl")
    backend.setup(ctx)
    train = tiny_data.split("train")
    assert backend.audit(ctx, train, None) == []          # nothing trained: nothing to attack
    rows = backend.inversion_rows(backend._initial(), train.images, train.labels,
                                  partition_clients(train, backend.options, 0), ctx.workdir)
    views = {r["view"] for r in rows if r["metric"] == "inversion_psnr"}
    assert {r["phase"] for r in rows} == {"audit"}
    assert all(r["artifact"].endswith(f"inversion-{r['view']}.png") for r in rows)
    assert views == {"baseline", "update", "update-ldp", "aggregate"}
    assert {r["metric"] for r in rows} == {"inversion_psnr", "inversion_ssim",
                                           "control_inversion_psnr", "control_inversion_ssim"}
    assert (ctx.workdir / "audit" / "inversion-overview.png").exists()


# -------------------------------------------------------------------------------------------
# what the server reads: SecAgg+ against plain FedAvg
# -------------------------------------------------------------------------------------------

class RecordingGrid:
    """The in-process Grid, keeping every reply the server receives (its whole view)."""

    def __init__(self, inner) -> None:
        self.inner, self.replies = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def send_and_receive(self, messages, *, timeout=None):
        replies = self.inner.send_and_receive(messages, timeout=timeout)
        self.replies += list(replies)
        return replies


def _server_view(tmp_path, tiny_data, tiny_model, privacy):
    from flwr.app import Context, RecordDict

    from backends.fl.app import INITIAL, make_client_app, make_secagg_client_app, server_main

    job = _inline_job(tmp_path, tiny_data, tiny_model, privacy=privacy)
    app = make_secagg_client_app(job) if privacy == "secagg" else make_client_app(job)
    grid = RecordingGrid(InlineGrid(app, len(job.sites)))
    server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}), job)
    with np.load(tmp_path / "server" / INITIAL) as z:
        init = {k: z[k] for k in z.files}
    return job, grid.replies, init


def _site_update(job, init, site_index):
    """Site k's true round-1 update, recomputed at the site (deterministic recipe)."""
    from backends.fl.app import client_train

    new, _, _ = client_train(job, site_index, init, 1, 0.0)
    return np.concatenate([(new[k] - init[k]).ravel() for k in init])


def _corr(a, b):
    return float(np.corrcoef(a, b)[0, 1])


def test_server_reads_one_sites_update_without_secagg(tmp_path, tiny_data, tiny_model):
    """Positive control: under plain FedAvg the server holds site 1's update exactly."""
    job, replies, init = _server_view(tmp_path, tiny_data, tiny_model, "none")
    truth = _site_update(job, init, 0)
    site1 = [m for m in replies if not m.has_error() and "arrays" in m.content
             and m.content["metrics"]["partition-id"] == 0]
    assert len(site1) == 1
    from backends.fl.app import MODEL_KEY, flatten

    read = site1[0].content["arrays"][MODEL_KEY].numpy() - flatten(init)
    assert np.allclose(read, truth, atol=1e-6) and _corr(read, truth) > 0.9999


def test_server_cannot_read_one_sites_update_under_secagg(tmp_path, tiny_data, tiny_model):
    """Everything the server receives from site 1 under SecAgg+ (all four stages) is
    uncorrelated with site 1's update; the same decoder on the unmasked fixed-point vector
    (the one thing SecAgg+ adds is the masks) recovers it, so the decoder is not the reason."""
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    from backends.fl.app import SECAGG_QUANTIZATION, secagg_scales

    job, replies, init = _server_view(tmp_path, tiny_data, tiny_model, "secagg")
    keys = list(init)
    scales = secagg_scales([init[k] for k in keys])
    new_truth = _site_update(job, init, 0)
    sizes = np.cumsum([0] + [init[k].size for k in keys])
    truth = np.concatenate([new_truth[a:b] / s for a, b, s in zip(sizes[:-1], sizes[1:], scales)])
    node1 = 101                                       # InlineGrid: site 1 is node 101
    masked = []
    for m in replies:
        if m.has_error() or int(m.metadata.src_node_id) != node1:
            continue
        for rec in m.content.config_records.values():
            for value in rec.values():
                if isinstance(value, list) and value and isinstance(value[0], bytes):
                    try:
                        masked.append([bytes_to_ndarray(v) for v in value])
                    except Exception:  # noqa: BLE001 - key shares and ciphertexts: not arrays
                        pass
        assert not m.content.array_records or all(len(r) == 0 for r in m.content.array_records.values())
    # the masked upload: [weight factor] + one masked fixed-point array per model array
    masked = [arrs[1:] for arrs in masked if sum(a.size for a in arrs) == truth.size + 1]
    assert len(masked) == 1, "site 1 uploads its masked vector exactly once"

    def decode(arrays):   # the server's best reading: dequantise as if nothing were masked
        flat = [a.astype(np.int64) % 2 ** 32 for a in arrays]
        return np.concatenate([a.ravel() for a in dequantize(flat, 8.0, SECAGG_QUANTIZATION)])

    read = decode(masked[0])
    assert abs(_corr(read, truth)) < 0.05
    unmasked = quantize([truth.astype(np.float64)], 8.0, SECAGG_QUANTIZATION)
    assert _corr(decode(unmasked), truth) > 0.999


def test_local_mode_scores_each_image_with_its_own_sites_model(tmp_path, tiny_data, tiny_model):
    """Sites come from the harness's BatchMeta; an unknown site gets the mean of all models."""
    from backends.fl.app import predict
    from suite.backend import BatchMeta

    backend = _backend(mode="local", rounds=1, resolution=32)
    ctx = _ctx(tiny_model, tmp_path / "fl-local")
    backend.setup(ctx)
    backend.fit(tiny_data.split("train"), ctx)
    test = tiny_data.split("test")
    x = test.images[:4]
    own = backend.predict_proba(x, BatchMeta(tuple(f"i{i}" for i in range(4)), ("site-2",) * 4))
    assert np.allclose(own, predict(backend.site_nets["site-2"], x))
    assert not np.allclose(own, predict(backend.site_nets["site-5"], x))
    other = backend.predict_proba(x, BatchMeta(tuple(f"i{i}" for i in range(4)), ("elsewhere",) * 4))
    assert np.allclose(other, np.mean([predict(n, x) for n in backend.site_nets.values()], axis=0))
    assert _rows(backend, "local_routed_fraction")[0]["value"] == 0.5


# -------------------------------------------------------------------------------------------
# the deployment engine's SuperNode poll (a patch of Flower: it must hit exactly its target)
# -------------------------------------------------------------------------------------------

def test_supernode_patch_shortens_only_flowers_two_polls(monkeypatch):
    import inspect
    import time

    from flwr.supernode import start_client_internal as loop

    from backends.fl.supernode import FlowerChanged, patch_supernode_poll

    monkeypatch.setattr(loop, "time", time)       # restored after the test
    assert loop.time.sleep is time.sleep           # control: unpatched, Flower's real 3 s sleep
    patch_supernode_poll(idle_s=0.01, reply_s=0.01)
    assert loop.time is not time and time.sleep is not loop.time.sleep   # nothing else changes
    start = time.perf_counter()
    loop.time.sleep(3)
    loop.time.sleep(0.5)
    assert time.perf_counter() - start < 1.0
    start = time.perf_counter()
    loop.time.sleep(0.2)                            # any other sleep is left as it is
    assert time.perf_counter() - start >= 0.19
    assert loop.time.monotonic is time.monotonic
    # a Flower whose loop changed is refused, not patched blindly
    monkeypatch.setattr(inspect, "getsource", lambda _m: "while True: pass")
    with pytest.raises(FlowerChanged):
        patch_supernode_poll()


def test_object_pull_patch_shortens_only_flowers_retry_backoff(monkeypatch):
    """The deployment engine's second labelled patch: Flower's object pull retries an object
    that is not uploaded yet after 1 s (doubling); patched, after PULL_BACKOFF_S. The waits
    are recorded, not timed; a module whose pull_objects is not Flower's is refused."""
    import threading
    import types

    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    from backends.fl.supernode import PULL_BACKOFF_S, FlowerChanged, patch_object_pull

    waits: list[float] = []
    real_wait = threading.Event.wait

    def wait(self, timeout=None):          # the backoff's waits are recorded and skipped
        if timeout is None:
            return real_wait(self)
        waits.append(timeout)
        return False
    monkeypatch.setattr(threading.Event, "wait", wait)

    def pull_with(fn):
        seen = set()

        def pull_object(object_id):
            if object_id not in seen:            # missing on the first try, as in a real race
                seen.add(object_id)
                raise ObjectUnavailableError(object_id)
            return b"content"
        waits.clear()
        assert fn(["obj"], pull_object, max_concurrent_pulls=1) == {"obj": b"content"}
        return list(waits)

    fake = types.ModuleType("fake_flower_module")
    fake.pull_objects = inflatable_utils.pull_objects
    assert pull_with(fake.pull_objects)[0] >= 0.8            # control: Flower's 1 s (+-20 %)
    patch_object_pull(fake)
    assert pull_with(fake.pull_objects)[0] == pytest.approx(PULL_BACKOFF_S, rel=0.21)
    patch_object_pull(fake)                                   # idempotent: wraps Flower's, once
    assert fake.pull_objects.func is inflatable_utils.pull_objects
    fake.pull_objects = lambda *a, **k: {}
    with pytest.raises(FlowerChanged):
        patch_object_pull(fake)


def test_supernode_idle_poll_backs_off_and_resets_on_activity():
    """The patched idle poll: short right after a message, doubling while idle up to its cap,
    short again once a message was handled (a reply wait, or a long gap between polls)."""
    from backends.fl.supernode import IdleBackoff

    now = [0.0]
    idle = IdleBackoff(0.05, 1.0, lambda: now[0])
    waits = []
    for _ in range(7):
        waits.append(idle.next_wait())
        now[0] += waits[-1]
    assert waits == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    idle.activity()                                   # a message is being handled
    assert idle.next_wait() == 0.05
    now[0] += 0.05 + 2.0                              # a message came and went between polls
    assert idle.next_wait() == 0.05


# -------------------------------------------------------------------------------------------
# the site runner in the SuperNode's process: Runtime API calls in-process (a labelled patch)
# -------------------------------------------------------------------------------------------

def test_in_process_runtime_calls_flowers_handlers_and_authenticates_tasks(monkeypatch):
    """LocalRuntimeClient calls the handlers Flower's Runtime routes call, on a real
    NodeState: an idle SuperNode has no task to acquire, and a task call with a token the
    state never issued is refused as the HTTP route refuses it. A Flower whose handler or
    Runtime API start-up changed is refused, not called blindly."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest, PullTaskInputRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.error import FlowerError
    from flwr.supercore.object_store import ObjectStoreFactory
    import importlib

    from flwr.supernode.nodestate import NodeStateFactory
    from flwr.supernode.servicer.runtime import runtime_handlers

    from backends.fl.local_runtime import FlowerRuntimeChanged, LocalRuntime, check_handlers

    cli = importlib.import_module("flwr.supernode.cli.flower_supernode")
    runtime = LocalRuntime()
    monkeypatch.setattr(cli, "_start_supernode_http_api", cli._start_supernode_http_api)
    runtime.capture()
    factory = NodeStateFactory(objectstore_factory=ObjectStoreFactory())
    runtime.factory = factory
    runtime.ready.set()
    res = runtime.client(None).AcquireTask(AcquireTaskRequest(
        supported_task_types=[TaskType.CLIENT_APP.value], agentapp_fab_hashes=[]))
    assert not res.HasField("task") and not res.token
    with pytest.raises(FlowerError, match="authentication"):
        runtime.client("not-a-token").PullTaskInput(PullTaskInputRequest())
    check_handlers()
    monkeypatch.setattr(runtime_handlers, "pull_object", lambda request, state: None)
    with pytest.raises(FlowerRuntimeChanged):
        check_handlers()
    monkeypatch.setattr(runtime_handlers, "pull_object", runtime_handlers.pull_object)
    monkeypatch.setattr(cli, "_start_supernode_http_api", lambda config: None)
    with pytest.raises(FlowerRuntimeChanged):
        LocalRuntime().capture()


def test_reply_wait_is_woken_by_the_runner_and_wakes_it():
    """The in-process hand-off: the SuperNode's reply wait tells the runner a task is
    stored, and returns as soon as the runner says its reply is pushed (not after its
    timeout); without the runner's signal it waits out the (fallback) timeout."""
    import threading
    import time

    from backends.fl.supernode import Wakeups

    w = Wakeups()
    start = time.perf_counter()
    w.reply_wait(0.2)                                    # control: nobody answers
    assert time.perf_counter() - start >= 0.19 and w.task_ready.is_set()
    w.task_ready.clear()
    threading.Timer(0.05, w.reply_ready.set).start()
    start = time.perf_counter()
    w.reply_wait(5.0)
    assert time.perf_counter() - start < 2.0 and not w.reply_ready.is_set()
