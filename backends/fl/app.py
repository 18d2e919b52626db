"""The Flower apps behind the `fl` backend: one ServerApp, two ClientApps, both engines.

Everything a run needs travels in an `FLJob` (plain JSON): the simulation engine builds the
apps around it in-process (`make_server_app(job)`, `make_client_app(job)`); the deployment
engine runs a generated Flower App whose entry module calls the same factories without a
job, so the apps read the job file named by the run-config key `job`.

Sites: each ClientApp is one site (`node_config["partition-id"]` indexes `job.sites`) and
reads only `<data_dir>/<site>.npz`, its own training partition.

Privacy hybrids are compositions of Flower's own parts, never flags inside the training code:
  dp      DifferentialPrivacyClientSideFixedClipping(FedAvg) + fixedclipping_mod, with
          Flower's RDP accountant (site-level central DP of the released model);
  ldp     on each site, Flower's update clipping + Gaussian noise calibrated for
          sensitivity 2 x clip with the analytic Gaussian mechanism, drawn from the OS CSPRNG
          (backends/fl/privacy.py: Flower's LocalDpMod uses sensitivity = clip, the classic
          formula valid only for epsilon < 1, and NumPy's Mersenne Twister);
  secagg  SecAgg+ (SecAggPlusWorkflow + secaggplus_mod). In Flower 1.41 SecAgg+ exists only
          for the legacy strategy API (LegacyContext + DefaultWorkflow + flwr.server.strategy
          + a NumPyClient behind secaggplus_mod); none of the Message-API strategies in
          flwr.serverapp.strategy has a secure-aggregation counterpart. This path therefore
          runs the legacy workflow on the same Grid and engines.

Traffic is measured at the ServerApp's Grid (`MeteredGrid`): every message the server sends
or receives is serialised the way Flower ships it (the deflated object tree: message
header + RecordDict + ArrayRecord + Array chunks), and its bytes are booked per round, per
node and per message type. Each site pulls its own copy, so bytes to a node are what that
site downloads; HTTP framing and TLS are not included.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

JOB_KEY = "job"                  # run-config key of the job file (deployment engine)
SUMMARY = "summary.json"
FINAL = "final.npz"
INITIAL = "initial.npz"
SECAGG_QUANTIZATION = 2 ** 26    # SecAgg+ quantisation levels (sum of n < 64 sites fits 2**32)
# Federated evaluation carried in the next round's train message (`carries_evaluation`): the
# train config names the round whose global model the site evaluates first (EVALUATE_FIRST),
# the reply carries that evaluation as its own MetricRecord (EVALUATION_RECORD).
EVALUATE_FIRST = "evaluate-round"
EVALUATION_RECORD = "evaluation"


@dataclass
class FLJob:
    """One federation, as plain JSON."""

    out_dir: str
    data_dir: str
    sites: list[str]
    n_labels: int
    architecture: dict[str, Any]
    strategy: str = "fedavg"
    proximal_mu: float = 0.0
    rounds: int = 3
    local_epochs: int = 1
    fraction: float = 1.0
    min_clients: int = 2
    privacy: str = "none"
    clip: float = 1.0
    noise_multiplier: float = 1.0
    dp_delta: float = 1e-3
    ldp_epsilon: float = 10.0
    ldp_delta: float = 1e-5
    bn: str = "shared"               # shared (FedAvg averages BatchNorm too) | local (FedBN)
    drop_site: str = ""
    drop_round: int = 0
    round_eval: bool = True
    round_timeout: float = 600.0
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    augment: bool = True
    seed: int = 0
    threads: int = 2
    max_site_examples: int = 1
    started_at: float = 0.0

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "FLJob":
        return cls(**json.loads(Path(path).read_text()))

    def to_ref(self) -> str:
        """The job inline, for the run config: nothing but the data has to be shared."""
        import base64

        return "b64:" + base64.b64encode(json.dumps(dataclasses.asdict(self)).encode()).decode()

    @classmethod
    def from_ref(cls, ref: str) -> "FLJob":
        """A run-config value: 'b64:<job JSON>' or a path to a job file."""
        import base64

        if ref.startswith("b64:"):
            return cls(**json.loads(base64.b64decode(ref[4:]).decode()))
        return cls.load(ref)

    def n_sampled(self) -> int:
        n = len(self.sites)
        return min(n, max(int(n * self.fraction), self.min_train()))

    def min_train(self) -> int:
        return max(1, min(self.min_clients, len(self.sites)))


def carries_evaluation(job: FLJob) -> bool:
    """Whether round r's federated evaluation travels in round r + 1's train message.

    The train message of round r + 1 carries exactly the global model round r's evaluate
    message would carry, and a site's own BatchNorm layers (FedBN) are the same until it
    trains again, so evaluating it first and training second computes the same numbers
    with one exchange per round instead of two (the last round keeps its evaluate
    exchange). Only where the two schedules reach the same sites: every site trains every
    round (fraction 1; evaluation always asks all sites), no planned crash (a site that
    dies in training would lose the previous round's evaluation with it), and not SecAgg+
    (Flower's legacy workflow runs its own schedule). Both engines run this same app."""
    return job.round_eval and job.fraction >= 1.0 and not job.drop_site and job.privacy != "secagg"


# ---------------------------------------------------------------------------------------
# model helpers (torch), shared with backends.fl
# ---------------------------------------------------------------------------------------

def set_threads(n: int) -> None:
    import torch

    if torch.get_num_threads() != max(1, n):
        torch.set_num_threads(max(1, n))


def calibrate_bn(net, resolution: int, seed: int) -> None:
    """Data-free BatchNorm statistics: the running stats of uniform noise in xrv range.

    Only the initial model gets this (shared by every mode): it puts running statistics on
    the right scale before anyone trains, which SecAgg+'s fixed-point encoding needs and
    which makes a round-0 evaluation meaningful. No site data is involved.
    """
    import torch

    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None          # cumulative average over the calibration batch
    gen = torch.Generator().manual_seed(seed + 4242)
    net.train()
    with torch.no_grad():
        net.features2(torch.rand(32, 1, resolution, resolution, generator=gen) * 2048 - 1024)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    net.eval()


def initial_model(architecture: dict[str, Any], n_labels: int, resolution: int, seed: int):
    """The seeded starting point every mode (federated, centralised, local) trains from."""
    import torch

    from suite.models import build_densenet

    torch.manual_seed(seed)
    net = build_densenet(architecture, n_labels)
    calibrate_bn(net, resolution, seed)
    return net


def model_copy(net, architecture: dict[str, Any], n_labels: int):
    """A fresh DenseNet holding `net`'s weights and BatchNorm statistics (start=model)."""
    from suite.models import build_densenet

    copy = build_densenet(architecture, n_labels)
    copy.load_state_dict(net.state_dict())
    return copy.eval()


def array_keys(net) -> list[str]:
    """What travels: every parameter and BatchNorm running statistic (not the int counters)."""
    return [k for k, v in net.state_dict().items() if v.is_floating_point()]


MODEL_KEY = "model"              # the one Array a model travels as


def flatten(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The model as one float32 vector (key order = array_keys): one Array per message, so
    Flower's per-array object headers do not add up over ~200 small BatchNorm arrays."""
    return np.concatenate([np.asarray(a, dtype=np.float32).ravel() for a in arrays.values()])


def layout_of(arrays: dict[str, np.ndarray]) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(np.shape(v))) for k, v in arrays.items()]


def unflatten(flat: np.ndarray, layout: list[tuple[str, tuple[int, ...]]]) -> dict[str, np.ndarray]:
    flat = np.asarray(flat, dtype=np.float32).ravel()
    sizes = [int(np.prod(shape)) for _, shape in layout]
    if flat.size != sum(sizes):
        raise ValueError(f"model vector has {flat.size} values, the architecture {sum(sizes)}")
    out, at = {}, 0
    for (k, shape), n in zip(layout, sizes):
        out[k] = flat[at:at + n].reshape(shape)
        at += n
    return out


_LAYOUTS: dict[str, list[tuple[str, tuple[int, ...]]]] = {}


def job_layout(job: "FLJob") -> list[tuple[str, tuple[int, ...]]]:
    key = json.dumps([job.architecture, job.n_labels], sort_keys=True, default=str)
    if key not in _LAYOUTS:
        _LAYOUTS[key] = layout_of(get_arrays(_build(job)))
    return _LAYOUTS[key]


def get_arrays(net) -> dict[str, np.ndarray]:
    state = net.state_dict()
    return {k: state[k].detach().cpu().numpy().astype(np.float32, copy=True) for k in array_keys(net)}


def set_arrays(net, arrays: dict[str, np.ndarray]) -> None:
    """Load arrays; a noised running variance is clamped to stay positive (post-processing)."""
    import torch

    state = {k: torch.from_numpy(np.asarray(v, dtype=np.float32).copy()) for k, v in arrays.items()}
    for k, v in state.items():
        if k.endswith("running_var"):
            v.clamp_(min=1e-5)
    missing = set(array_keys(net)) - set(state)
    if missing:
        raise ValueError(f"update lacks arrays {sorted(missing)[:3]}...")
    net.load_state_dict(state, strict=False)


def site_path(data_dir: str | Path, site: str) -> Path:
    return Path(data_dir) / f"{site}.npz"


# ---------------------------------------------------------------------------------------
# FedBN: BatchNorm layers that stay at their site
# ---------------------------------------------------------------------------------------

_BN_KEYS: dict[str, list[str]] = {}


def batchnorm_keys(job: "FLJob") -> list[str]:
    """The arrays FedBN keeps local: every BatchNorm layer's affine weight and bias and its
    running mean and variance."""
    import torch

    key = json.dumps([job.architecture, job.n_labels], sort_keys=True, default=str)
    if key not in _BN_KEYS:
        net = _build(job)
        _BN_KEYS[key] = [f"{name}.{part}" for name, m in net.named_modules()
                         if isinstance(m, torch.nn.BatchNorm2d)
                         for part in ("weight", "bias", "running_mean", "running_var")]
    return _BN_KEYS[key]


def local_layers_path(data_dir: str | Path, site: str, data_path: str | None = None) -> Path:
    """Where a site keeps its own BatchNorm layers (FedBN): beside its data, on its disk."""
    data = Path(data_path or site_path(data_dir, site))
    return data.with_name(data.stem + ".local-bn.npz")


def load_local_layers(path: Path) -> dict[str, np.ndarray] | None:
    if not path.exists():
        return None
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def save_local_layers(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def save_site(data_dir: Path, site: str, images: np.ndarray, labels: np.ndarray,
              val_images: np.ndarray | None = None, val_labels: np.ndarray | None = None) -> Path:
    """A site's file: its training partition and its held-out validation slice."""
    path = site_path(data_dir, site)
    path.parent.mkdir(parents=True, exist_ok=True)
    if val_images is None:
        val_images, val_labels = images[:0], labels[:0]
    np.savez(path, images=images.astype(np.float32), labels=labels.astype(np.float32),
             val_images=val_images.astype(np.float32), val_labels=val_labels.astype(np.float32))
    return path


_SITE_CACHE: dict[str, Any] = {}


def load_site(data_dir: str | Path, site: str, data_path: str | None = None, part: str = "train"):
    """A site's training partition (part="train") or validation slice (part="val") as an
    ImageSet (cached per process).

    `data_path` (a SuperNode's `--node-config data-path=...`) overrides
    `<data_dir>/<site>.npz`: on real machines each site points at its own file. A file
    without a validation slice validates on its training partition.
    """
    from suite.data.imageset import ImageSet

    path = str(data_path or site_path(data_dir, site))
    key = f"{path}:{part}"
    if key not in _SITE_CACHE:
        with np.load(path) as z:
            prefix = "val_" if part == "val" and "val_images" in z.files and len(z["val_images"]) else ""
            images, labels = z[prefix + "images"], z[prefix + "labels"]
        n = len(images)
        ids = np.array([f"{site}-{part}-{i}" for i in range(n)])
        _SITE_CACHE[key] = ImageSet(name=site, images=images, labels=labels,
                                    label_names=[f"l{j}" for j in range(labels.shape[1])],
                                    image_ids=ids, sites=np.full(n, site), patient_ids=ids,
                                    splits=np.full(n, part))
    return _SITE_CACHE[key]


def train_local(net, data, epochs: int, job: FLJob, seed: int, proximal_mu: float = 0.0,
                crash_after_batches: int | None = None) -> float:
    """The suite's one plaintext recipe (suite.training) on one site's data.

    FedProx adds mu * (w - w_global) to each gradient (the gradient of the proximal term
    mu/2 * ||w - w_global||^2) through tensor hooks, so the recipe itself is untouched.
    Returns the mean training loss of the last epoch.
    """

    from suite.training import Recipe, train_logits_model

    recipe = Recipe(epochs=epochs, batch_size=job.batch_size, lr=job.lr,
                    weight_decay=job.weight_decay, seed=seed, augment=job.augment)
    params = list(net.parameters())
    hooks = []
    if proximal_mu > 0:
        for p in params:
            anchor = p.detach().clone()
            hooks.append(p.register_hook(lambda g, p=p, a=anchor: g + proximal_mu * (p.detach() - a)))
    forward = lambda x: net.classifier(net.features2(x))  # noqa: E731
    if crash_after_batches is not None:
        seen = {"n": 0}

        def forward(x, _f=forward):  # noqa: F811 - a site that dies mid-round
            seen["n"] += 1
            if seen["n"] > crash_after_batches:
                raise SiteCrash("simulated crash mid-round")
            return _f(x)
    net.train()
    try:
        history = train_logits_model(forward, params, data, list(range(data.labels.shape[1])), recipe)
    finally:
        for h in hooks:
            h.remove()
        net.eval()
    return float(history[-1]) if history else float("nan")


class SiteCrash(RuntimeError):
    """Raised by a site told to drop out (option drop_site / drop_round)."""


def predict(net, images: np.ndarray, batch: int = 256) -> np.ndarray:
    import torch

    net.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch], dtype=np.float32))
            out.append(torch.sigmoid(net.classifier(net.features2(x)).double()).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def evaluate_local(net, data) -> tuple[float, float]:
    """(masked BCE, macro AUROC over labels with both classes) of `net` on one site's data."""
    from sklearn.metrics import roc_auc_score

    p = predict(net, data.images)
    y = data.labels
    eps = 1e-7
    known = ~np.isnan(y)
    pc = np.clip(p, eps, 1 - eps)
    yk = np.nan_to_num(y)
    bce = -(yk * np.log(pc) + (1 - yk) * np.log(1 - pc))
    loss = float(bce[known].mean()) if known.any() else float("nan")
    aucs = []
    for j in range(y.shape[1]):
        k = known[:, j]
        if k.sum() and 0 < y[k, j].sum() < k.sum():
            aucs.append(roc_auc_score(y[k, j], p[k, j]))
    return loss, float(np.mean(aucs)) if aucs else float("nan")


def round_seed(job: FLJob, server_round: int, site_index: int) -> int:
    return job.seed * 10007 + server_round * 101 + site_index


def secagg_scales(arrays: list[np.ndarray]) -> list[float]:
    """Per-array divisor both sides derive from the global model, so SecAgg+'s fixed-point
    range [-8, 8] holds weights (~0.1) and BatchNorm variances (~1e5) alike."""
    return [max(1.0, float(np.abs(a).max())) if a.size else 1.0 for a in arrays]


def secagg_scale_vector(model: dict[str, np.ndarray]) -> np.ndarray:
    """`secagg_scales` of each array, repeated over its values (for the flat model vector)."""
    scales = secagg_scales(list(model.values()))
    return np.concatenate([np.full(np.size(a), s, dtype=np.float32) for a, s in zip(model.values(), scales)])


# ---------------------------------------------------------------------------------------
# client side
# ---------------------------------------------------------------------------------------

_JOB_CACHE: dict[str, FLJob] = {}


def _job_from_context(context, job: FLJob | None) -> FLJob:
    if job is not None:
        return job
    ref = str(context.run_config[JOB_KEY])
    if ref not in _JOB_CACHE:
        _JOB_CACHE[ref] = FLJob.from_ref(ref)
    return _JOB_CACHE[ref]


def _site_index(context) -> int:
    return int(context.node_config["partition-id"])


def _data_path(context) -> str | None:
    value = context.node_config.get("data-path")
    return str(value) if value else None


def _build(job: FLJob):
    from suite.models import build_densenet

    set_threads(job.threads)
    return build_densenet(job.architecture, job.n_labels)


def _crash_point(job: FLJob, site: str, server_round: int) -> int | None:
    """Batches after which this site dies in this round (None: it does not).

    0: it has received the round's model and dies as local training starts, so the server
    has sent its message and waits for a reply that comes back as an error.
    """
    if job.drop_site and site == job.drop_site and server_round == job.drop_round:
        return 0
    return None


def site_model_arrays(job: FLJob, site: str, arrays: dict[str, np.ndarray],
                      data_path: str | None = None) -> dict[str, np.ndarray]:
    """What a site computes with: the global arrays, with its own BatchNorm layers under
    FedBN (bn=local) once it has trained (before that, the global model's)."""
    if job.bn != "local":
        return arrays
    own = load_local_layers(local_layers_path(job.data_dir, site, data_path))
    return {**arrays, **own} if own else arrays


def client_train(job: FLJob, site_index: int, arrays: dict[str, np.ndarray], server_round: int,
                 proximal_mu: float, data_path: str | None = None) -> tuple[dict[str, np.ndarray], int, float]:
    site = job.sites[site_index]
    data = load_site(job.data_dir, site, data_path)
    net = _build(job)
    set_arrays(net, site_model_arrays(job, site, arrays, data_path))
    loss = train_local(net, data, job.local_epochs, job, round_seed(job, server_round, site_index),
                       proximal_mu, crash_after_batches=_crash_point(job, site, server_round))
    new = get_arrays(net)
    if job.bn == "local":
        save_local_layers(local_layers_path(job.data_dir, site, data_path),
                          {k: new[k] for k in batchnorm_keys(job)})
    return new, len(data), loss


def client_evaluate(job: FLJob, site_index: int, arrays: dict[str, np.ndarray],
                    data_path: str | None = None) -> tuple[int, float, float]:
    site = job.sites[site_index]
    data = load_site(job.data_dir, site, data_path, part="val")
    net = _build(job)
    set_arrays(net, site_model_arrays(job, site, arrays, data_path))
    loss, auroc = evaluate_local(net, data)
    return len(data), loss, auroc


def evaluation_record(job: FLJob, site_index: int, arrays: dict[str, np.ndarray],
                      data_path: str | None = None):
    """One site's federated evaluation as the MetricRecord its reply carries (an evaluate
    reply, or beside the update in the next round's train reply)."""
    from flwr.app import MetricRecord

    n, loss, auroc = client_evaluate(job, site_index, arrays, data_path)
    return MetricRecord({"num-examples": n, "unit-weight": 1, "eval-loss": loss,
                         "eval-auroc": auroc, "partition-id": site_index})


def _privacy_mod(job: FLJob | None):
    """A client mod that applies Flower's own DP mod the job asks for (composition)."""

    def mod(msg, context, call_next):
        from flwr.clientapp.mod import fixedclipping_mod

        from backends.fl.privacy import calibrate_std, local_dp_mod

        j = _job_from_context(context, job)
        if j.privacy == "dp":
            return fixedclipping_mod(msg, context, call_next)
        if j.privacy == "ldp":
            std = calibrate_std(j.ldp_epsilon, j.ldp_delta, j.clip)
            return local_dp_mod(j.clip, std)(msg, context, call_next)
        return call_next(msg, context)

    return mod


def make_client_app(job: FLJob | None = None):
    """Message-API ClientApp (FedAvg, FedProx, DP, LDP). `job=None`: read it from run config.

    sklearn.metrics (the evaluation's AUROC) is imported here, as the app loads, so its
    one-off import lands in round 1 on both engines, not in the first round that evaluates
    (round 2's train message, where the evaluation is carried)."""
    import sklearn.metrics  # noqa: F401

    from flwr.app import ArrayRecord, Array, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train(mods=[_privacy_mod(job)])
    def train(msg: Message, context):
        j = _job_from_context(context, job)
        idx = _site_index(context)
        layout = job_layout(j)
        arrays = unflatten(msg.content["arrays"][MODEL_KEY].numpy(), layout)
        config = msg.content["config"]
        mu = float(config.get("proximal-mu", 0.0))
        content = {}
        if int(config.get(EVALUATE_FIRST, 0)) > 0:   # the previous round's evaluation, first:
            content[EVALUATION_RECORD] = evaluation_record(   # training replaces FedBN layers
                j, idx, arrays, _data_path(context))
        new, n, loss = client_train(j, idx, arrays, int(config["server-round"]), mu,
                                    _data_path(context))
        metrics = MetricRecord({"num-examples": n, "unit-weight": 1, "train-loss": loss,
                                "partition-id": idx})
        out = ArrayRecord({MODEL_KEY: Array(flatten({k: new[k] for k, _ in layout}))})
        return Message(RecordDict({"arrays": out, "metrics": metrics, **content}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context):
        j = _job_from_context(context, job)
        idx = _site_index(context)
        arrays = unflatten(msg.content["arrays"][MODEL_KEY].numpy(), job_layout(j))
        metrics = evaluation_record(j, idx, arrays, _data_path(context))
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def make_secagg_client_app(job: FLJob | None = None):
    """Legacy ClientApp (NumPyClient behind secaggplus_mod): what SecAgg+ needs in Flower.

    The model travels as one vector. The site uploads its update divided by public
    per-array scales (`secagg_scale_vector`), so the fixed-point encoding holds every array;
    the server multiplies the unmasked mean back.
    """
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp

    class SiteClient(NumPyClient):
        def __init__(self, j: FLJob, idx: int, data_path: str | None) -> None:
            self.job, self.idx, self.data_path = j, idx, data_path

        def _arrays(self, parameters):
            return unflatten(parameters[0], job_layout(self.job))

        def fit(self, parameters, config):
            arrays = self._arrays(parameters)
            new, n, loss = client_train(self.job, self.idx, arrays, int(config["server-round"]), 0.0,
                                        self.data_path)
            delta = (flatten({k: new[k] for k in arrays}) - flatten(arrays)) / secagg_scale_vector(arrays)
            return [delta.astype(np.float32)], n, {"train-loss": loss, "partition-id": self.idx}

        def evaluate(self, parameters, config):
            n, loss, auroc = client_evaluate(self.job, self.idx, self._arrays(parameters),
                                             self.data_path)
            return loss, n, {"eval-auroc": auroc, "partition-id": self.idx}

    def client_fn(context):
        return SiteClient(_job_from_context(context, job), _site_index(context),
                          _data_path(context)).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod])


# ---------------------------------------------------------------------------------------
# server side
# ---------------------------------------------------------------------------------------

def message_bytes(msg) -> int:
    """Bytes of a message as Flower serialises it for transport (header + object tree)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    try:
        return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())
    except Exception:   # an error reply without content still has a header
        try:
            from flwr.common.serde import message_to_proto

            return len(message_to_proto(msg).SerializeToString())
        except Exception:
            return 0


def _partition_id(msg) -> int | None:
    if msg.has_error():
        return None
    for rec in msg.content.metric_records.values():
        if "partition-id" in rec:
            return int(round(float(rec["partition-id"])))
    return None


@dataclass
class Traffic:
    round: int
    node: int
    kind: str
    down: int = 0        # server -> node
    up: int = 0          # node -> server
    messages: int = 0
    errors: int = 0
    missing: int = 0     # sent, no reply before the timeout


class MeteredGrid:
    """Wraps the ServerApp's Grid: books the serialised size of every message it carries."""

    def __init__(self, grid) -> None:
        self._grid = grid
        self.round = 0
        self.traffic: dict[tuple[int, int, str], Traffic] = {}
        self.node_site: dict[int, int] = {}
        self.first_reply_at: float | None = None
        # per push-and-poll exchange: when it started, when the push returned, each reply's
        # arrival (wall clock; the deployment engine's round profile, docs/federated-deployment.md)
        self.exchanges: list[dict[str, Any]] = []

    def __getattr__(self, name):            # run, set_run, get_node_ids, create_message, ...
        return getattr(self._grid, name)

    def _round_of(self, msg) -> int:
        group = str(msg.metadata.group_id or "")
        return int(group) if group.isdigit() else self.round

    def _book(self, r: int, node: int, kind: str) -> Traffic:
        key = (r, int(node), kind)
        if key not in self.traffic:
            self.traffic[key] = Traffic(r, int(node), kind)
        return self.traffic[key]

    def _push_and_poll(self, messages, timeout):
        """Flower's send_and_receive (push, then pull until every reply is in or the timeout),
        polling every POLL_S instead of its fixed 3 s: on loopback that sleep, not the sites,
        set the length of a deployment round."""
        started = time.time()
        ids = set(self._grid.push_messages(messages))
        exchange = {"round": self.round, "kind": str(messages[0].metadata.message_type) if messages else "",
                    "started": started, "pushed": time.time(), "replies": []}
        self.exchanges.append(exchange)
        end = time.time() + (timeout if timeout is not None else 0.0)
        replies = []
        while timeout is None or time.time() < end:
            got = list(self._grid.pull_messages(ids))
            replies += got
            exchange["replies"] += [time.time()] * len(got)
            ids.difference_update(r.metadata.reply_to_message_id for r in got)
            if not ids:
                break
            time.sleep(self.POLL_S)
        return replies

    POLL_S = 0.1

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if not messages:          # e.g. an evaluation carried in the next train message
            return []
        sent = {}
        for m in messages:
            t = self._book(self._round_of(m), m.metadata.dst_node_id, str(m.metadata.message_type))
            t.down += message_bytes(m)
            t.messages += 1
            sent[int(m.metadata.dst_node_id)] = t
        if hasattr(self._grid, "push_messages") and hasattr(self._grid, "pull_messages"):
            replies = self._push_and_poll(messages, timeout)
        else:   # a Grid with only send_and_receive (the tests' in-process Grid)
            replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        if replies and self.first_reply_at is None:
            self.first_reply_at = time.time()
        answered = set()
        for r in replies:
            node = int(r.metadata.src_node_id)
            answered.add(node)
            t = sent.get(node) or self._book(self._round_of(r), node, str(r.metadata.message_type))
            t.up += message_bytes(r)
            t.messages += 1
            if r.has_error():
                t.errors += 1
            pid = _partition_id(r)
            if pid is not None:
                self.node_site[node] = pid
        for node, t in sent.items():
            if node not in answered:
                t.missing += 1
        return replies

    def push_messages(self, messages):
        messages = list(messages)
        for m in messages:
            t = self._book(self._round_of(m), m.metadata.dst_node_id, str(m.metadata.message_type))
            t.down += message_bytes(m)
            t.messages += 1
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids):
        replies = list(self._grid.pull_messages(message_ids))
        for r in replies:
            t = self._book(self._round_of(r), r.metadata.src_node_id, str(r.metadata.message_type))
            t.up += message_bytes(r)
            t.messages += 1
            t.errors += int(r.has_error())
        return replies


@dataclass
class RoundLog:
    round: int
    replies: int = 0
    failures: int = 0
    aggregated: bool = False
    note: str = ""
    train: dict[str, float] = field(default_factory=dict)
    evaluate: dict[str, float] = field(default_factory=dict)
    started: float = 0.0
    finished: float = 0.0


def _quorum_strategy(inner, min_replies: int, metered: MeteredGrid, log: dict[int, RoundLog],
                     carried=None, rounds: int = 0):
    """Wrap any Message-API strategy: a round aggregates only with >= min_replies results.

    `carried` (the base strategy, see `carries_evaluation`): round r's federated evaluation
    travels in round r + 1's train message and is aggregated exactly as the base strategy's
    aggregate_evaluate would (its evaluate_metrics_aggr_fn and weighting key, over the
    replies without error); only the last round has an evaluate exchange of its own."""
    from flwr.app import ConfigRecord, RecordDict
    from flwr.serverapp.strategy import Strategy

    class Quorum(Strategy):
        def __init__(self) -> None:
            self.strategy = inner

        def _log(self, r: int) -> RoundLog:
            return log.setdefault(r, RoundLog(r, started=time.time()))

        def configure_train(self, server_round, arrays, config, grid):
            metered.round = server_round
            self._log(server_round)
            if carried is not None and server_round > 1:
                config = ConfigRecord({**config, EVALUATE_FIRST: server_round - 1})
            return self.strategy.configure_train(server_round, arrays, config, grid)

        def _carried_evaluation(self, server_round, replies) -> None:
            """Take the previous round's evaluation out of the train replies (the strategy
            sees the replies it expects) and aggregate it as that round's."""
            evaluated = []
            for m in replies:
                if not m.has_error() and EVALUATION_RECORD in m.content:
                    evaluated.append(RecordDict({"metrics": m.content[EVALUATION_RECORD]}))
                    del m.content[EVALUATION_RECORD]
            if evaluated:
                metrics = carried.evaluate_metrics_aggr_fn(evaluated, carried.weighted_by_key)
                self._log(server_round - 1).evaluate = {
                    k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            if carried is not None:
                self._carried_evaluation(server_round, replies)
            entry = self._log(server_round)
            ok = [m for m in replies if not m.has_error()]
            entry.replies, entry.failures = len(ok), len(replies) - len(ok)
            if len(ok) < min_replies:
                entry.note = f"only {len(ok)} of {len(replies)} sites replied (< min_clients {min_replies})"
                entry.finished = time.time()
                return None, None
            arrays, metrics = self.strategy.aggregate_train(server_round, replies)
            entry.aggregated = arrays is not None
            if arrays is None:
                entry.note = "the strategy skipped aggregation (Flower's DP wrappers refuse rounds with failures)"
            entry.train = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}
            entry.finished = time.time()
            return arrays, metrics

        def configure_evaluate(self, server_round, arrays, config, grid):
            metered.round = server_round
            if carried is not None and server_round < rounds:
                return []             # evaluated in round server_round + 1's train message
            return self.strategy.configure_evaluate(server_round, arrays, config, grid)

        def aggregate_evaluate(self, server_round, replies):
            replies = list(replies)
            if carried is not None and server_round < rounds:
                return None
            metrics = self.strategy.aggregate_evaluate(server_round, replies)
            self._log(server_round).evaluate = {k: float(v) for k, v in (metrics or {}).items()
                                                if isinstance(v, (int, float))}
            return metrics

        def summary(self) -> None:
            self.strategy.summary()

    return Quorum()


def _message_api_run(metered: MeteredGrid, job: FLJob, init: dict[str, np.ndarray],
                     log: dict[int, RoundLog]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    from flwr.app import Array, ArrayRecord, ConfigRecord
    from flwr.serverapp.strategy import (DifferentialPrivacyClientSideFixedClipping, FedAvg,
                                         FedProx)

    n = len(job.sites)
    kwargs = dict(fraction_train=job.fraction, fraction_evaluate=1.0 if job.round_eval else 0.0,
                  min_train_nodes=job.min_train(), min_evaluate_nodes=job.min_train(),
                  min_available_nodes=n,
                  weighted_by_key="unit-weight" if job.privacy == "dp" else "num-examples")
    if job.strategy == "fedprox":
        base = FedProx(proximal_mu=job.proximal_mu, **kwargs)
    else:
        base = FedAvg(**kwargs)
    strategy, info = base, {}
    accountant = None
    if job.privacy == "dp":
        from flwr.serverapp import NeighboringRelation, PrivacyConfig, SamplingMethod

        try:   # RdpAccountant needs dp-accounting (flwr's [dp] extra)
            from flwr.serverapp import RdpAccountant

            accountant = RdpAccountant(PrivacyConfig(
                target_delta=job.dp_delta, population_size=n,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION))
        except ImportError as exc:
            info["dp_accounting"] = f"unavailable: {exc}"
        strategy = DifferentialPrivacyClientSideFixedClipping(
            base, job.noise_multiplier, job.clip, job.n_sampled(), accountant=accountant)
    strategy = _quorum_strategy(strategy, job.min_train(), metered, log,
                                carried=base if carries_evaluation(job) else None, rounds=job.rounds)
    layout = layout_of(init)
    result = strategy.start(grid=metered, initial_arrays=ArrayRecord({MODEL_KEY: Array(flatten(init))}),
                            num_rounds=job.rounds, timeout=job.round_timeout,
                            train_config=ConfigRecord({}), evaluate_config=ConfigRecord({}))
    final = result.arrays
    arrays = unflatten(final[MODEL_KEY].numpy(), layout) if final is not None and len(final) else init
    if accountant is not None:
        spent = accountant.get_privacy_spent()
        info.update(dp_epsilon=float(spent.epsilon), dp_delta=float(spent.delta),
                    dp_releases=int(spent.num_releases))
    return arrays, info


def _secagg_run(metered: MeteredGrid, context, job: FLJob, init: dict[str, np.ndarray],
                log: dict[int, RoundLog]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    layout = layout_of(init)
    n = len(job.sites)

    def weighted(metrics):
        total = sum(k for k, _ in metrics) or 1
        names = {name for _, m in metrics for name in m if name != "partition-id"}
        return {name: sum(k * float(m.get(name, 0.0)) for k, m in metrics) / total for name in names}

    class DeltaFedAvg(LegacyFedAvg):
        """FedAvg over scaled updates: the server only ever holds the SecAgg+ mean."""

        def configure_fit(self, server_round, parameters, client_manager):
            metered.round = server_round
            log.setdefault(server_round, RoundLog(server_round, started=time.time()))
            self.current = parameters_to_ndarrays(parameters)[0]
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            entry = log.setdefault(server_round, RoundLog(server_round))
            entry.replies, entry.failures = len(results), len(failures)
            if len(results) < job.min_train():
                entry.note = f"only {len(results)} sites in the aggregate (< min_clients)"
                entry.finished = time.time()
                return None, {}
            params, metrics = super().aggregate_fit(server_round, results, failures)
            if params is None:
                entry.finished = time.time()
                return None, metrics
            mean_delta = parameters_to_ndarrays(params)[0]
            scales = secagg_scale_vector(unflatten(self.current, layout))
            new = [(self.current + mean_delta * scales).astype(np.float32)]
            entry.aggregated = True
            entry.train = {k: float(v) for k, v in (metrics or {}).items()}
            entry.finished = time.time()
            return ndarrays_to_parameters(new), metrics

        def configure_evaluate(self, server_round, parameters, client_manager):
            metered.round = server_round
            return super().configure_evaluate(server_round, parameters, client_manager)

        def aggregate_evaluate(self, server_round, results, failures):
            loss, metrics = super().aggregate_evaluate(server_round, results, failures)
            entry = log.setdefault(server_round, RoundLog(server_round))
            if loss is not None:
                entry.evaluate = {"eval-loss": float(loss),
                                  **{k: float(v) for k, v in (metrics or {}).items()}}
            return loss, metrics

    strategy = DeltaFedAvg(
        fraction_fit=job.fraction, fraction_evaluate=1.0 if job.round_eval else 0.0,
        min_fit_clients=max(2, job.min_train()), min_evaluate_clients=max(1, job.min_train()),
        min_available_clients=n, initial_parameters=ndarrays_to_parameters([flatten(init)]),
        on_fit_config_fn=lambda r: {"server-round": r},
        fit_metrics_aggregation_fn=weighted, evaluate_metrics_aggregation_fn=weighted)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=job.rounds,
                                                                round_timeout=job.round_timeout),
                           strategy=strategy)
    workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
        num_shares=1.0, reconstruction_threshold=0.5, max_weight=float(job.max_site_examples),
        clipping_range=8.0, quantization_range=SECAGG_QUANTIZATION, modulus_range=2 ** 32,
        timeout=job.round_timeout))
    workflow(metered, legacy)
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server.workflow.constant import MAIN_PARAMS_RECORD

    params = compat.arrayrecord_to_parameters(legacy.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
    final = unflatten(parameters_to_ndarrays(params)[0], layout)
    shares = job.n_sampled()          # num_shares=1.0: every sampled site holds a share
    info = {"secagg_shares": shares, "secagg_threshold": max(2, round(0.5 * shares)),
            "secagg_quantization": SECAGG_QUANTIZATION}
    return final, info


def server_main(grid, context, job: FLJob) -> None:
    """Run the federation and write summary.json + final.npz into job.out_dir."""
    import logging

    logging.getLogger("flwr").setLevel(logging.WARNING)
    if type(getattr(grid, "_grid", grid)).__module__ == "flwr.superlink.grid.http_grid":
        # deployment engine: the labelled object-pull backoff patch (backends/fl/supernode.py)
        from flwr.superlink.grid import http_grid

        from backends.fl.object_pull import patch_object_pull

        patch_object_pull(http_grid)
    random.seed(job.seed)            # which sites a round samples: reproducible, not secret
    if job.privacy == "dp":
        # Flower's central-DP wrapper draws its noise from NumPy's global generator: seed it
        # from the OS CSPRNG, never from the run's published seed
        np.random.seed(int.from_bytes(os.urandom(4), "little"))
    else:
        np.random.seed(job.seed)
    set_threads(job.threads)
    out = Path(job.out_dir)
    started = time.time()
    with np.load(out / INITIAL) as z:
        init = {k: z[k] for k in z.files}
    metered = MeteredGrid(grid)
    log: dict[int, RoundLog] = {}
    if job.privacy == "secagg":
        arrays, info = _secagg_run(metered, context, job, init, log)
    else:
        arrays, info = _message_api_run(metered, job, init, log)
    np.savez(out / FINAL, **arrays)
    summary = {
        "rounds": [dataclasses.asdict(log[r]) for r in sorted(log)],
        "traffic": [dataclasses.asdict(t) for t in metered.traffic.values()],
        "node_site": {str(k): job.sites[v] for k, v in metered.node_site.items() if 0 <= v < len(job.sites)},
        "model_bytes": int(sum(a.nbytes for a in init.values())),
        "n_sampled": job.n_sampled(),
        "server_started": started,
        "first_reply_at": metered.first_reply_at,
        "exchanges": metered.exchanges,
        "finished": time.time(),
        **info,
    }
    tmp = out / (SUMMARY + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(out / SUMMARY)


def make_server_app(job: FLJob | None = None):
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        server_main(grid, context, _job_from_context(context, job))

    return app
