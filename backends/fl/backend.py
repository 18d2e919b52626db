"""Federated learning across hospital sites with Flower, and its two controls.

One `fl` entry expands into three leaderboard rows trained with the suite's one plaintext
recipe (suite.training), from the same starting point (`start=model`: the suite's model in
ctx, i.e. the model owner's; `start=scratch`: a seeded initial model) and with the same
training budget of `rounds x local_epochs` epochs over the hospital training images, i.e.
the same number of examples processed (emitted once per row as `train_budget_epochs`):

  fl                   federated: each site is a Flower client holding only its own training
                       partition; the strategy (FedAvg | FedProx) runs `rounds` rounds of
                       `local_epochs` local epochs on the chosen engine.
  fl[mode=centralised] control: all sites' data pooled, rounds x local_epochs epochs. The
                       federated row (and the local row) are compared against it.
  fl[mode=local]       control: each site trains alone for rounds x local_epochs epochs and
                       each test image is scored by the model of its own site (the harness
                       names each image's site in `BatchMeta.sites`), so the per-site AUROC is
                       "site k's model on site k's patients".

BatchNorm (`bn`): the federated row is FedBN by default (`auto` = `local` without privacy):
every BatchNorm layer stays at its site, and each test image is scored by its own site's
model (global weights + that site's BatchNorm; site from `BatchMeta.sites`), as the
local-only control scores it. With privacy (dp, ldp, secagg) BatchNorm is averaged
(`shared`): their guarantee covers one released global model.

Every mode holds out the same `val_fraction` of each site's partition: the federated
evaluation after each round runs there (`round_val_auroc`), and no mode trains on it.

Hybrids are registered configurations, compositions of Flower's parts: `fl:privacy=dp`
(central DP wrapper + client clipping mod, RDP-accounted), `fl:privacy=ldp` (Flower's
clipping + CSPRNG Gaussian noise calibrated for sensitivity 2 x clip, see
backends/fl/privacy.py), `fl:privacy=secagg` (SecAgg+). See backends/fl/app.py for the apps
and docs/federated-deployment.md for running the federation across machines.

Extra rows (tidy: the round number is the `round` qualifier):
  round_train_loss / round_val_loss / round_val_auroc   convergence per round
  round_bytes_down / round_bytes_up             server->sites / sites->server per round
  train_budget_epochs, train_examples, train_steps, training_rounds   the budget
  bytes_per_round, train_bytes_per_round, comm_floor_bytes, comm_ratio_vs_floor, model_bytes
  dropped_clients (per round and total), failed_rounds, engine_startup_time
  epsilon / delta (dp: central, site level; ldp: local, site level, over all rounds)
  inversion_psnr / inversion_ssim               gradient-inversion audit (audit phase)
  control_inversion_psnr / control_inversion_ssim  the same attack on a positive-control CNN
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from suite.backend import Backend, BackendContext, BackendOptions, BatchMeta
from suite.errors import SuiteError
from suite.threat_model import ThreatModel

MODES = ("federated", "centralised", "local")
STRATEGIES = ("fedavg", "fedprox")
ENGINES = ("simulation", "deployment")
PRIVACY = ("none", "dp", "ldp", "secagg")
PARTITIONS = ("sites", "dirichlet")
STARTS = ("model", "scratch")
BATCHNORM = ("auto", "local", "shared")


@dataclass
class FLOptions(BackendOptions):
    mode: str = "federated"         # federated | centralised | local (controls; expand() adds them)
    strategy: str = "fedavg"        # fedavg | fedprox
    proximal_mu: float = 0.1        # FedProx's mu (ignored by FedAvg)
    rounds: int = 3
    local_epochs: int = 1           # per round; the controls train rounds * local_epochs epochs
    start: str = "model"            # model (ctx.model's weights) | scratch (seeded initial model)
    val_fraction: float = 0.1       # of each site's partition, held out of training in every mode
    lr: float = 0.0                 # peak learning rate of every mode (0 = the recipe's)
    fraction: float = 1.0           # fraction of sites sampled per round
    min_clients: int = 2            # a round aggregates only with at least this many results
    engine: str = "simulation"      # simulation (Ray) | deployment (SuperLink + SuperNodes)
    privacy: str = "none"           # none | dp (central) | ldp (local) | secagg (SecAgg+)
    bn: str = "auto"                # BatchNorm: local (FedBN) | shared (averaged) | auto: local
                                    # without privacy, shared with it (one released global model)
    clip: float = 1.0               # DP clipping norm of a site's update (dp, ldp)
    noise_multiplier: float = 1.0   # central DP noise, in units of clip (dp)
    dp_delta: float = 1e-3          # delta the central-DP epsilon is reported at (site level)
    ldp_epsilon: float = 10.0       # local DP epsilon per round, sensitivity 2 x clip (ldp)
    ldp_delta: float = 1e-5         # local DP delta per round (ldp)
    partition: str = "sites"        # sites (the dataset's sites) | dirichlet (label skew)
    n_clients: int = 7              # clients of the Dirichlet partition
    alpha: float = 0.5              # Dirichlet concentration (smaller = more skewed)
    drop_site: str = ""             # a site that crashes mid-round (fault test), e.g. site-3
    drop_round: int = 0             # ... in this round
    round_eval: bool = True         # federated evaluation after each round (convergence curve)
    round_timeout: float = 600.0    # seconds the server waits for replies in one round
    resolution: int = 0             # train/predict at this side length (0 = the dataset's)
    audit: bool = False             # gradient-inversion audit, audit phase (federated only; ~1 min)
    audit_steps: int = 150
    audit_images: int = 2
    batch_size: int = 64            # predict batch


# Options that do not matter to a control: reset to defaults so every variant shares one.
_CONTROL_KEEP = ("rounds", "local_epochs", "start", "val_fraction", "lr", "resolution", "partition",
                 "n_clients", "alpha", "batch_size")


def control_options(options: FLOptions, mode: str) -> FLOptions:
    keep = {k: getattr(options, k) for k in _CONTROL_KEEP}
    return FLOptions(mode=mode, **keep)


class FLBackend(Backend):
    name = "fl"
    track = "training"
    extra = "fl"
    requires = ("flwr", "ray")
    Options = FLOptions
    tolerance = None
    default_batch_size = 64
    test_options = {"rounds": 2, "local_epochs": 1, "audit": False, "round_eval": True,
                    "resolution": 32}
    conformance_variants = ({}, {"privacy": "dp"}, {"privacy": "ldp"}, {"privacy": "secagg"},
                            {"engine": "deployment"})

    def __init__(self, options: FLOptions | None = None) -> None:
        super().__init__(options)
        o = self.options
        for name, allowed in (("mode", MODES), ("strategy", STRATEGIES), ("engine", ENGINES),
                              ("privacy", PRIVACY), ("partition", PARTITIONS), ("start", STARTS),
                              ("bn", BATCHNORM)):
            if getattr(o, name) not in allowed:
                raise SuiteError(f"backend 'fl' option {name}='{getattr(o, name)}' is not one of "
                                 f"{', '.join(allowed)}")
        if o.rounds < 1 or o.local_epochs < 1:
            raise SuiteError("backend 'fl' needs rounds >= 1 and local_epochs >= 1")
        if o.lr < 0:
            raise SuiteError("backend 'fl' option lr must be >= 0 (0 = the recipe's)")
        if not 0 <= o.val_fraction < 0.5:
            raise SuiteError("backend 'fl' option val_fraction must be in [0, 0.5)")
        if not 0 < o.fraction <= 1:
            raise SuiteError("backend 'fl' option fraction must be in (0, 1]")
        if o.bn == "local" and o.privacy != "none":
            raise SuiteError("backend 'fl': bn=local (FedBN) keeps per-site layers outside the "
                             f"released global model that privacy={o.privacy} covers; use bn=shared")
        if o.privacy == "secagg" and o.strategy != "fedavg":
            raise SuiteError("backend 'fl': privacy=secagg runs SecAgg+ with FedAvg only")
        if o.privacy in ("dp", "ldp") and o.clip <= 0:
            raise SuiteError("backend 'fl': clip must be positive")
        if o.privacy == "ldp" and (o.ldp_epsilon <= 0 or not 0 < o.ldp_delta < 1):
            raise SuiteError("backend 'fl': privacy=ldp needs ldp_epsilon > 0 and 0 < ldp_delta < 1")
        self.net = None
        self.site_nets: dict[str, Any] = {}
        self.rows: list[dict] = []
        self.summary: dict[str, Any] = {}
        self._routed = [0, 0]
        self._audit_inputs: dict[str, Any] | None = None

    # ---------------------------------------------------------------- configurations
    @classmethod
    def expand(cls, options: FLOptions) -> list["Backend"]:
        out = [cls(options)]
        if options.mode == "federated" and options.privacy == "none":
            out.append(cls(control_options(options, "local")))
        return out

    def reference(self):
        if self.options.mode == "centralised":
            return None
        return FLBackend(control_options(self.options, "centralised"))

    def batchnorm(self) -> str:
        """local (FedBN) or shared: what `bn` means for this configuration."""
        if self.options.mode != "federated":
            return "shared"
        if self.options.bn == "auto":
            return "local" if self.options.privacy == "none" else "shared"
        return self.options.bn

    def batchnorm_text(self) -> str:
        if self.batchnorm() == "local":
            return ("FedBN: every BatchNorm layer (affine weight, bias and running statistics) "
                    "stays at its site and is never loaded from the server; the other weights "
                    "are FedAvg-averaged; each test image is scored by its own site's model "
                    "(global weights + that site's BatchNorm layers)")
        return "BatchNorm layers are averaged with the other weights (one global model)"

    def budget_epochs(self) -> int:
        return self.options.rounds * self.options.local_epochs

    # ---------------------------------------------------------------- threat model
    def threat_model(self) -> ThreatModel:
        o = self.options
        budget = (f"{o.rounds} rounds x {o.local_epochs} local epoch(s)" if o.mode == "federated"
                  else f"{self.budget_epochs()} epochs")
        budget += "; " + self.start_text()
        sim = o.engine == "simulation" and o.mode == "federated"
        from backends.fl.supernode import PATCHED

        where = ("sites simulated as Ray actors on one host (Flower Simulation Engine)" if sim else
                 "SuperLink and SuperNodes as separate processes on loopback, TLS off; "
                 + PATCHED if o.mode == "federated" else "one host")
        if o.mode == "centralised":
            return ThreatModel(
                protects=(), from_whom="nobody: control configuration",
                adversary="none considered", parties=("one host holding every site's images",),
                trust_assumptions=("every site hands its images and labels to one place",),
                guarantee_kind="none",
                guarantee=f"no protection: the pooled-data control ({budget}, same recipe)",
                leaks=("all sites' images and labels", "the model"), protected_scope="nothing",
                notes="reference for the federated and local-only rows")
        if o.mode == "local":
            return ThreatModel(
                protects=("input_images",), from_whom="everyone outside each site",
                adversary="any outsider; sites do not interact",
                parties=("each site alone",),
                trust_assumptions=("each site trusts only itself",),
                guarantee_kind="data_locality",
                guarantee=f"nothing leaves a site: no collaboration at all ({budget} per site)",
                leaks=(), protected_scope="everything; each site's model stays at the site",
                notes="control: what a site gets without federating; each test image is scored "
                      "by its own site's model")
        parties = ("hospital sites (Flower SuperNodes/ClientApps)", "aggregation server (SuperLink + ServerApp)")
        base_trust = ("the server runs the agreed strategy and sends every site the same model",
                      "sites train honestly on their own data",
                      "in deployment, channels are TLS-protected (this benchmark's loopback runs insecure)")
        strategy = f"{o.strategy} ({budget}); {self.batchnorm_text()}"
        if o.privacy == "dp":
            eps = _central_dp_epsilon(o.noise_multiplier, o.rounds, self._n_sites_hint(), o.dp_delta)
            eps_text = f"epsilon={eps:.3g}" if eps is not None else "epsilon from Flower's RDP accountant"
            return ThreatModel(
                protects=("input_images", "training_membership"),
                from_whom="other sites and anyone who receives the global model",
                adversary="semi-honest sites and model users; the server is trusted to add the noise",
                parties=parties, trust_assumptions=base_trust + (
                    "the server adds Gaussian noise to the aggregate (central DP)",),
                guarantee_kind="differential_privacy",
                guarantee=(f"site-level ({eps_text}, delta={o.dp_delta:g})-DP of the released "
                           f"global model after {o.rounds} rounds: updates clipped to {o.clip:g} at "
                           f"each site, noise multiplier {o.noise_multiplier:g}, all sites every "
                           f"round (no sampling amplification); {strategy}"),
                leaks=("each site's clipped update to the server (invertible: the server sees "
                       "it before noise is added)", "per-site example counts and metrics"),
                protected_scope="released model and aggregate updates; not the individual "
                                "updates the server sees",
                simulated=sim, notes=where)
        if o.privacy == "ldp":
            from backends.fl.privacy import calibrate_std, composed_epsilon

            std = calibrate_std(o.ldp_epsilon, o.ldp_delta, o.clip)
            total = composed_epsilon(std, o.clip, o.rounds, o.ldp_delta)
            return ThreatModel(
                protects=("input_images", "training_membership"),
                from_whom="the server, other sites and model users",
                adversary="semi-honest server and sites",
                parties=parties, trust_assumptions=base_trust[1:] + (
                    "each site's noise is drawn from its OS CSPRNG and never revealed",),
                guarantee_kind="differential_privacy",
                guarantee=(f"site-level local DP of everything a site sends: each update clipped "
                           f"to {o.clip:g} (sensitivity 2 x clip = {2 * o.clip:g}: two clipped "
                           f"updates differ by up to twice the clip) and noised at the site with "
                           f"std {std:.3g} (analytic Gaussian), ({o.ldp_epsilon:g}, "
                           f"{o.ldp_delta:g})-DP per round; over {o.rounds} rounds "
                           f"(epsilon={total:.3g}, delta={o.ldp_delta:g}) by exact Gaussian (GDP) "
                           f"composition; {strategy}"),
                leaks=("noised updates", "final model to all sites",
                       "per-site example counts, training losses and evaluation metrics, in clear"),
                protected_scope="every model update leaving a site (not its loss and metric "
                                "reports, which are sent in clear)",
                simulated=sim, notes=where)
        if o.privacy == "secagg":
            n = self._n_sites_hint()
            threshold = max(2, round(0.5 * n))
            return ThreatModel(
                protects=("input_images",),
                from_whom="the aggregation server (individual updates) and other sites",
                adversary=f"semi-honest server; fewer than {threshold} colluding parties",
                parties=parties, trust_assumptions=base_trust[1:] + (
                    "SecAgg+ key agreement and secret sharing are sound",),
                guarantee_kind="cryptographic",
                guarantee=(f"SecAgg+ (Flower): the server learns only the sum of the sampled sites' "
                           f"updates each round; masks are secret-shared among all {n} sites with "
                           f"reconstruction threshold {threshold}, so up to {n - threshold} dropouts "
                           f"are tolerated; fixed-point encoding with 2^26 levels; {strategy}"),
                leaks=("the aggregate update each round", "final model to all sites",
                       "which sites took part",
                       "each site's example count, training loss and evaluation loss/AUROC, in "
                       "clear (SecAgg+ covers the model update only)"),
                protected_scope="individual site updates (the aggregate and the model are exposed)",
                simulated=sim, notes=where + "; SecAgg+ runs on Flower's legacy strategy API "
                                             "(the Message API has no SecAgg+)")
        return ThreatModel(
            protects=("input_images",),
            from_whom="the aggregation server and the other sites",
            adversary="semi-honest (honest-but-curious) server and sites",
            parties=parties, trust_assumptions=base_trust,
            guarantee_kind="data_locality",
            guarantee=f"raw images and labels never leave their site; only model weights are "
                      f"exchanged; {strategy}",
            leaks=("each site's model update every round (invertible in principle: see the "
                   "inversion audit)", "final model to all sites", "per-site example counts and metrics"),
            protected_scope="training data at rest at each site; updates and model are exposed",
            simulated=sim, notes=where)

    def fit_scope(self) -> str:
        """The engine processes that start inside the timed run (the rest start in prepare_fit)."""
        if self.options.mode != "federated":
            return ""
        if self.options.engine == "simulation":
            return ("the Flower simulation engine's start-up (the simulation process, Ray and its "
                    "actors, in round 1)")
        return "the ServerApp process's start"

    def start_text(self) -> str:
        if self.options.start == "scratch":
            return "from a seeded initial model (no pre-training)"
        return ("from the suite's model in ctx (the model owner's; its training data is "
                "recorded in run.json)")

    def _n_sites_hint(self) -> int:
        return self.options.n_clients if self.options.partition == "dirichlet" else 7

    # ---------------------------------------------------------------- lifecycle
    def setup(self, ctx: BackendContext) -> None:
        from backends.fl.app import set_threads

        set_threads(ctx.threads)
        self.ctx = ctx
        self.resolution = int(self.options.resolution or ctx.model.resolution)
        self.labels = list(ctx.model.pathologies)
        self.architecture = dict(ctx.model.architecture)

    def _initial(self):
        """The starting point every mode trains from (a fresh copy each call)."""
        from backends.fl.app import initial_model, model_copy

        if self.options.start == "model":
            return model_copy(self.ctx.model.net, self.architecture, len(self.labels))
        return initial_model(self.architecture, len(self.labels), self.resolution, self.ctx.seed)

    def _recipe_job_fields(self) -> dict[str, Any]:
        from suite.training import Recipe

        r = Recipe()
        return dict(batch_size=r.batch_size, lr=self.options.lr or r.lr, weight_decay=r.weight_decay,
                    augment=r.augment)

    def prepare_fit(self, train, ctx: BackendContext) -> None:
        """Federated mode: partition the sites, write each site's file and start the engine's
        processes (SuperLink; for the deployment engine also every SuperNode with its warm
        ClientApp runner). One-off set-up, not training: the harness times it as setup, so
        `fit_time` is the federated run itself (and `engine_startup_time` says what the
        start-up took). A failed fit is cleaned up by teardown."""
        self._federation = None
        if self.options.mode == "federated":
            self._federation = self._start_federation(train, ctx)

    def fit(self, train, ctx: BackendContext) -> None:
        fed = getattr(self, "_federation", None)
        if self.options.mode == "federated":
            if fed is None or fed["train"] is not train:   # fit without prepare_fit (direct use)
                self.teardown()
                fed = self._federation = self._start_federation(train, ctx)
            images, fit_idx = fed["images"], fed["clients"]
            self._run_federation(train, fed, ctx)
        else:
            from backends.audits.gradient_inversion import downsample

            images = downsample(train.images, self.resolution)
            clients = partition_clients(train, self.options, ctx.seed)
            fit_idx, _ = split_validation(clients, self.options.val_fraction, ctx.seed)
            if self.options.mode == "centralised":
                self._fit_centralised(train, images, np.sort(np.concatenate(list(fit_idx.values()))))
            else:
                self._fit_local(train, images, fit_idx)
        self.rows += budget_rows(self.options, fit_idx, self._recipe_job_fields()["batch_size"],
                                 self.start_text())

    def _dataset(self, train, images, index=None):
        from suite.data.imageset import ImageSet

        index = np.arange(len(train)) if index is None else np.asarray(index)
        return ImageSet(name=train.name, images=images[index], labels=train.labels[index],
                        label_names=list(train.label_names), image_ids=train.image_ids[index],
                        sites=train.sites[index], patient_ids=train.patient_ids[index],
                        splits=train.splits[index])

    def _job_like(self):
        from backends.fl.app import FLJob

        return FLJob(out_dir="", data_dir="", sites=[], n_labels=len(self.labels),
                     architecture=self.architecture, seed=self.ctx.seed, threads=self.ctx.threads,
                     **self._recipe_job_fields())

    def _fit_centralised(self, train, images, index) -> None:
        from backends.fl.app import train_local

        self.net = self._initial()
        train_local(self.net, self._dataset(train, images, index), self.budget_epochs(),
                    self._job_like(), seed=self.ctx.seed)

    def _fit_local(self, train, images, clients) -> None:
        from backends.fl.app import train_local

        job = self._job_like()
        for k, (site, index) in enumerate(clients.items()):
            net = self._initial()
            train_local(net, self._dataset(train, images, index), self.budget_epochs(), job,
                        seed=self.ctx.seed * 10007 + k)
            self.site_nets[site] = net

    def _start_federation(self, train, ctx) -> dict[str, Any]:
        """The sites' files, the initial model, the job, and the engine's processes."""
        from backends.audits.gradient_inversion import downsample
        from backends.fl.app import INITIAL, FLJob, get_arrays, local_layers_path, save_site
        from backends.fl.engine import EngineSession

        o = self.options
        images = downsample(train.images, self.resolution)
        clients, val = split_validation(partition_clients(train, o, ctx.seed), o.val_fraction, ctx.seed)
        work = Path(ctx.workdir)
        data_dir, out_dir = work / "sites", work / "server"
        out_dir.mkdir(parents=True, exist_ok=True)
        for site, index in clients.items():
            save_site(data_dir, site, images[index], train.labels[index],
                      images[val[site]], train.labels[val[site]])
            local_layers_path(data_dir, site).unlink(missing_ok=True)   # never a stale FedBN
        if o.drop_site and o.drop_site not in clients:
            raise SuiteError(f"backend 'fl': drop_site '{o.drop_site}' is not one of {list(clients)}")
        init = self._initial()
        np.savez(out_dir / INITIAL, **get_arrays(init))
        job = FLJob(out_dir=str(out_dir), data_dir=str(data_dir), sites=list(clients),
                    n_labels=len(self.labels), architecture=self.architecture,
                    strategy=o.strategy, proximal_mu=o.proximal_mu if o.strategy == "fedprox" else 0.0,
                    rounds=o.rounds, local_epochs=o.local_epochs, fraction=o.fraction,
                    min_clients=o.min_clients, privacy=o.privacy, clip=o.clip,
                    noise_multiplier=o.noise_multiplier, dp_delta=o.dp_delta,
                    ldp_epsilon=o.ldp_epsilon, ldp_delta=o.ldp_delta, bn=self.batchnorm(),
                    drop_site=o.drop_site,
                    drop_round=o.drop_round, round_eval=o.round_eval, round_timeout=o.round_timeout,
                    seed=ctx.seed, threads=self._site_threads(len(clients)),
                    max_site_examples=max(len(i) for i in clients.values()),
                    started_at=time.time(), **self._recipe_job_fields())
        job_path = job.save(work / "job.json")
        engine = EngineSession(work, job, job_path, o.engine)
        engine.start()
        return {"train": train, "images": images, "clients": clients, "init": init, "job": job,
                "engine": engine}

    def _run_federation(self, train, fed: dict[str, Any], ctx) -> None:
        from backends.fl.app import FINAL, SUMMARY, load_local_layers, local_layers_path, set_arrays

        o, job, clients = self.options, fed["job"], fed["clients"]
        report = fed["engine"].run()
        out_dir = Path(job.out_dir)
        self.summary = json.loads((out_dir / SUMMARY).read_text())
        self.summary["engine_startup_s"] = report.startup_s
        self.summary["engine_retries"] = report.retries
        with np.load(out_dir / FINAL) as z:
            arrays = {k: z[k] for k in z.files}
        self.net = self._initial()
        set_arrays(self.net, arrays)
        self.net.eval()
        if job.bn == "local":   # FedBN: each site's model = global weights + its own BatchNorm
            for site in clients:
                own = load_local_layers(local_layers_path(job.data_dir, site))
                if own is not None:
                    self.site_nets[site] = self._initial()
                    set_arrays(self.site_nets[site], {**arrays, **own})
                    self.site_nets[site].eval()
        self._meter(ctx)
        self.rows = federation_rows(self.summary, o, job.bn)
        # what the audit phase attacks: round 1's global model and each site's first images
        self._audit_inputs = {"init": fed["init"], "images": fed["images"], "labels": train.labels,
                              "clients": clients}

    def _site_threads(self, n_sites: int) -> int:
        """Threads per site process. Simulation: one actor at a time gets all the worker's
        threads; deployment: every site runs at once, so they share them (no oversubscription)."""
        if self.options.engine == "deployment":
            return max(1, self.ctx.threads // n_sites)
        return self.ctx.threads

    def _meter(self, ctx) -> None:
        """Book the measured traffic: the server and each site, fit phase."""
        node_site = self.summary.get("node_site", {})
        down = up = msgs = 0
        per_site: dict[str, list[int]] = {}
        rounds_by_site: dict[str, set] = {}
        for t in self.summary["traffic"]:
            site = node_site.get(str(t["node"]), f"node-{t['node']}")
            s = per_site.setdefault(site, [0, 0, 0])
            s[0] += t["up"]
            s[1] += t["down"]
            s[2] += t["messages"]
            rounds_by_site.setdefault(site, set()).add(t["round"])
            down += t["down"]
            up += t["up"]
            msgs += t["messages"]
        ctx.meter.record("server", sent=down, received=up, rounds=self.options.rounds, messages=msgs)
        for site, (sent, received, m) in sorted(per_site.items()):
            ctx.meter.record(site, sent=sent, received=received,
                             rounds=len(rounds_by_site[site] - {0}), messages=m)

    def audit(self, ctx: BackendContext, train, test) -> list[dict]:
        """Gradient inversion by the server (audit=true, federated rows), in the harness's
        audit phase: not part of the training time."""
        if not self.options.audit or self._audit_inputs is None:
            return []
        a = self._audit_inputs
        return self.inversion_rows(a["init"], a["images"], a["labels"], a["clients"],
                                   Path(ctx.workdir))

    def inversion_rows(self, init, images, labels, clients, work: Path) -> list[dict]:
        from backends.audits.gradient_inversion import (AttackConfig, control_cnn, control_forward, run_audit)
        from suite.training import Recipe

        o = self.options
        b = max(1, min(4, o.audit_images))
        batches = []
        for site, index in clients.items():
            idx = np.asarray(index)[:b]
            if len(idx) < b:
                continue
            batches.append((images[idx], labels[idx]))
        cfg = AttackConfig(images=b, steps=o.audit_steps, seed=self.ctx.seed)
        kw = dict(lr=Recipe().lr, clip=o.clip, epsilon=o.ldp_epsilon, delta=o.ldp_delta)
        rows = []
        for metric_prefix, model, fwd, sub in (
                ("inversion", init, None, "audit"),
                ("control_inversion", control_cnn(len(self.labels), cfg.size, self.ctx.seed),
                 control_forward, "audit-control")):
            results = run_audit(model, batches, cfg, forward=fwd, workdir=work / sub, **kw)
            target = "the round-1 global DenseNet" if fwd is None else "a positive-control CNN"
            for r in results:
                note = (f"{r.note}; attacker = server, target = {target}, {b} image(s) of "
                        f"{clients and next(iter(clients))} at {cfg.size}px, {cfg.steps} steps; "
                        "the reconstruction is the row's artifact")
                picture = str(work / sub / f"inversion-{r.view}.png")
                rows.append(_row(f"{metric_prefix}_psnr", r.psnr, "dB", False, note, phase="audit",
                                 view=r.view, party="server", artifact=picture))
                rows.append(_row(f"{metric_prefix}_ssim", r.ssim, "", False, note, phase="audit",
                                 view=r.view, party="server", artifact=picture))
        return rows

    def predict_proba(self, images: np.ndarray, meta: BatchMeta | None = None) -> np.ndarray:
        from backends.fl.app import predict
        from backends.audits.gradient_inversion import downsample

        x = downsample(images, self.resolution)
        if not self.site_nets:
            return predict(self.net, x)
        out = np.zeros((len(images), len(self.labels)))
        sites = np.array(meta.sites if meta is not None else [""] * len(images), dtype=object)
        for site, net in self.site_nets.items():
            rows = np.flatnonzero(sites == site)
            if len(rows):
                out[rows] = predict(net, x[rows])
        unknown = np.flatnonzero(~np.isin(sites, list(self.site_nets)))
        if len(unknown) and self.net is not None:   # a site without its own layers (reported):
            out[unknown] = predict(self.net, x[unknown])   # FedBN: the server's global model
        elif len(unknown):   # local-only: the mean of all site models (reported)
            out[unknown] = np.mean([predict(n, x[unknown]) for n in self.site_nets.values()], axis=0)
        self._routed[0] += len(images) - len(unknown)
        self._routed[1] += len(images)
        return out

    def teardown(self) -> None:
        """Stop the engine's processes if fit did not (it stops them when the run ends; a
        failed or skipped fit leaves them to this)."""
        fed = getattr(self, "_federation", None)
        if fed is not None:
            fed["engine"].stop()

    def versions(self) -> dict[str, str]:
        from suite.versions import library_versions

        return library_versions("flwr", "ray", "torch", "scikit-image")

    def extra_rows(self) -> list[dict]:
        rows = list(self.rows)
        if self.site_nets:
            routed, total = self._routed
            rest = ("the server's global model (averaged BatchNorm)" if self.options.mode == "federated"
                    else "the mean of all site models")
            rows.append(_row("local_routed_fraction", routed / total if total else None, "fraction",
                             True, "test images scored by their own site's model (site from the "
                                   "harness's BatchMeta); the rest (a site without a training "
                                   f"partition) get {rest}"))
        return rows


# -------------------------------------------------------------------------------------------
# helpers
# -------------------------------------------------------------------------------------------

def _row(metric: str, value, unit: str, hib, note: str | None = None, **kw) -> dict:
    row = {"metric": metric, "value": None if value is None else float(value), "unit": unit,
           "higher_is_better": hib}
    if note:
        row["note"] = note
    row.update({k: v for k, v in kw.items() if v is not None})
    return row


def _central_dp_epsilon(noise_multiplier: float, rounds: int, n_sites: int, delta: float) -> float | None:
    """epsilon of `rounds` Gaussian releases (no amplification) via Flower's RDP accountant."""
    try:
        from flwr.serverapp import (GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig,
                                    RdpAccountant, SamplingMethod)

        acc = RdpAccountant(PrivacyConfig(target_delta=delta, population_size=n_sites,
                                          neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                          sampling_method=SamplingMethod.NO_AMPLIFICATION))
        acc.compose(GaussianPrivacyEvent(noise_multiplier, n_sites, n_sites), count=rounds)
        return float(acc.get_privacy_spent().epsilon)
    except Exception:
        return None


def partition_clients(train, options: FLOptions, seed: int) -> dict[str, np.ndarray]:
    """Client name -> row indices of the training split.

    sites      one client per site of the dataset (synthetic: site-1..site-7).
    dirichlet  `n_clients` clients with label skew: each image gets a primary class (its
               first positive label, or "no finding"), and each class is spread over the
               clients with proportions drawn from Dirichlet(alpha); redrawn (up to 100
               times) until every client holds at least 2 images. Use it for data without
               sites, or to study skew.
    """
    if options.partition == "sites":
        sites = sorted(set(train.sites.tolist()))
        if len(sites) < 2:
            raise SuiteError("backend 'fl': the training split has fewer than 2 sites; "
                             "use partition=dirichlet")
        return {s: np.flatnonzero(train.sites == s) for s in sites}
    k = int(options.n_clients)
    if k < 2:
        raise SuiteError("backend 'fl': n_clients must be at least 2")
    y = np.nan_to_num(train.labels, nan=0.0) > 0
    primary = np.where(y.any(axis=1), y.argmax(axis=1), y.shape[1])
    rng = np.random.default_rng(seed + 31)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(k)]
        for c in np.unique(primary):
            rows = rng.permutation(np.flatnonzero(primary == c))
            share = rng.dirichlet(np.full(k, options.alpha))
            cuts = (np.cumsum(share)[:-1] * len(rows)).astype(int)
            for j, chunk in enumerate(np.split(rows, cuts)):
                parts[j].extend(chunk.tolist())
        if min(len(p) for p in parts) >= 2:
            break
    else:
        raise SuiteError(f"backend 'fl': a Dirichlet(alpha={options.alpha}) split of {len(train)} "
                         f"images left a client with < 2 images; raise alpha or lower n_clients")
    return {f"client-{j + 1}": np.sort(np.array(p)) for j, p in enumerate(parts)}


def split_validation(clients: dict[str, np.ndarray], fraction: float,
                     seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per client: (training rows, held-out validation rows). The same split in every mode,
    so no mode trains on an image another mode validates on."""
    rng = np.random.default_rng(seed + 57)
    fit, val = {}, {}
    for name, index in clients.items():
        index = np.asarray(index)
        n_val = int(round(fraction * len(index))) if fraction > 0 else 0
        n_val = min(n_val, len(index) - 2)
        pick = rng.permutation(len(index))
        val[name] = np.sort(index[pick[:max(0, n_val)]])
        fit[name] = np.sort(index[pick[max(0, n_val):]])
    return fit, val


def budget_rows(options: FLOptions, clients: dict[str, np.ndarray], batch_size: int,
                start: str) -> list[dict]:
    """The training budget every row of one fl entry spends, stated the same way for each."""
    epochs = options.rounds * options.local_epochs
    n = int(sum(len(i) for i in clients.values()))
    if options.mode == "centralised":
        steps = epochs * int(np.ceil(n / batch_size))
    else:   # federated (all sites every round at fraction=1) and local: per site, summed
        share = options.fraction if options.mode == "federated" else 1.0
        steps = int(round(share * sum(epochs * int(np.ceil(len(i) / batch_size))
                                      for i in clients.values())))
    how = (f"{options.rounds} rounds x {options.local_epochs} local epoch(s) = {epochs} epochs over "
           f"{n} hospital training images (validation hold-out excluded), batch {batch_size}, "
           f"{start}; the same for the federated row and its controls")
    rows = [_row("train_budget_epochs", epochs, "epochs", None, how),
            _row("train_examples", epochs * n * (options.fraction if options.mode == "federated" else 1),
                 "examples", None, "examples processed in training (epochs x images)"),
            _row("train_steps", steps, "steps", None,
                 "optimiser steps, summed over sites (each site steps on its own batches)")]
    if options.mode == "federated":
        rows.append(_row("training_rounds", options.rounds, "rounds", None,
                         "federated rounds (server -> sites -> server)"))
    return rows


def federation_rows(summary: dict[str, Any], options: FLOptions, bn: str = "shared") -> list[dict]:
    """Convergence, communication and fault rows from the ServerApp's summary."""
    rows: list[dict] = []
    rounds = summary.get("rounds", [])
    model = ("each site's model after this round (global weights + its own BatchNorm, FedBN)"
             if bn == "local" else "global model after this round")
    val_how = (f"{model}, federated evaluation on each site's held-out "
               f"validation slice ({options.val_fraction:g} of its partition, never trained on), "
               f"weighted by examples")
    if options.engine == "deployment":
        from backends.fl.supernode import PATCHED

        val_how += "; deployment engine: " + PATCHED
    for r in rounds:
        tr, ev = r.get("train", {}), r.get("evaluate", {})
        if "train-loss" in tr:
            rows.append(_row("round_train_loss", tr["train-loss"], "", False,
                             "mean local training loss of the sites in this round (last local "
                             "epoch, weighted by examples)", round=r["round"]))
        if "eval-loss" in ev:
            rows.append(_row("round_val_loss", ev["eval-loss"], "", False, val_how, round=r["round"]))
        if "eval-auroc" in ev:
            rows.append(_row("round_val_auroc", ev["eval-auroc"], "", True,
                             "macro AUROC of the " + val_how, round=r["round"]))
    traffic = summary.get("traffic", [])
    node_site = summary.get("node_site", {})
    per_round: dict[int, list[int]] = {}
    train_round: dict[int, int] = {}
    for t in traffic:
        if t["round"] <= 0:
            continue
        pr = per_round.setdefault(t["round"], [0, 0])
        pr[0] += t["down"]
        pr[1] += t["up"]
        if t["kind"].startswith("train"):
            train_round[t["round"]] = train_round.get(t["round"], 0) + t["down"] + t["up"]
    how = ("serialised Flower messages (deflated object tree) booked at the ServerApp's Grid; "
           "no HTTP framing/TLS")
    for rnd, (down, up) in sorted(per_round.items()):
        rows.append(_row("round_bytes_down", down, "bytes", False, "server -> sites; " + how,
                         round=rnd, party="server"))
        rows.append(_row("round_bytes_up", up, "bytes", False, "sites -> server; " + how,
                         round=rnd, party="server"))
    model_bytes = summary.get("model_bytes", 0)
    floor = model_bytes * summary.get("n_sampled", 0) * 2
    if per_round:
        all_mean = float(np.mean([d + u for d, u in per_round.values()]))
        rows.append(_row("bytes_per_round", all_mean, "bytes", False,
                         "both directions, all messages (training, evaluation, protocol); " + how))
    if train_round:
        train_mean = float(np.mean(list(train_round.values())))
        rows.append(_row("train_bytes_per_round", train_mean, "bytes", False,
                         "both directions, training messages only (for SecAgg+: all its stages)"))
        rows.append(_row("comm_ratio_vs_floor", train_mean / floor if floor else None, "ratio", False,
                         "train_bytes_per_round / comm_floor_bytes"))
    rows.append(_row("model_bytes", model_bytes, "bytes", None, "float32 arrays exchanged (weights + BN statistics)"))
    rows.append(_row("comm_floor_bytes", floor, "bytes", None,
                     "model bytes x sampled sites x 2 (one download, one upload) per round"))
    dropped_total = set()
    for r in rounds:
        sent_nodes = {t["node"] for t in traffic if t["round"] == r["round"] and t["kind"].startswith("train")}
        bad = {t["node"] for t in traffic if t["round"] == r["round"] and t["kind"].startswith("train")
               and (t["errors"] or t["missing"])}
        names = sorted(node_site.get(str(n), f"node-{n}") for n in bad)
        dropped_total.update((r["round"], n) for n in names)
        rows.append(_row("dropped_clients", len(bad), "clients", False,
                         ("dropped: " + ", ".join(names) + "; " if names else "")
                         + f"{r.get('replies', 0)} of {len(sent_nodes)} sampled sites aggregated"
                         + (f"; {r['note']}" if r.get("note") else ""), round=r["round"]))
    rows.append(_row("dropped_clients", len(dropped_total), "client-rounds", False,
                     "site-rounds lost to crashes or timeouts over the run"))
    rows.append(_row("failed_rounds", sum(not r.get("aggregated") for r in rounds), "rounds", False,
                     "rounds whose aggregate was not applied (too few results, or the DP wrapper "
                     "refused a round with failures)"))
    start = summary.get("engine_startup_s")
    if start is not None:
        how_start = ("SuperLink (simulation runtime) up; timed as setup (prepare_fit), not in "
                     "fit_time; the simulation process, Ray and its actors start inside the run "
                     "(fit_time, round 1)" if options.engine == "simulation"
                     else "SuperLink + all SuperNodes registered and their ClientApp runners warm "
                          "(Deployment Engine); timed as setup (prepare_fit), not in fit_time; "
                          "the ServerApp process starts inside the run (fit_time)")
        if options.engine == "deployment":
            from backends.fl.supernode import PATCHED

            how_start += "; " + PATCHED
        rows.append(_row("engine_startup_time", start, "s", False, how_start))
    if summary.get("engine_retries"):
        rows.append(_row("engine_retries", summary["engine_retries"], "runs", False,
                         "federations restarted from scratch because Ray's node did not start "
                         "within its fixed 30 s (loaded host); the rows are from the last one"))
    if "dp_epsilon" in summary:
        how = (f"site-level central DP of the released model (Flower's RDP accountant), after "
               f"{summary.get('dp_releases')} noised aggregates")
        rows.append(_row("epsilon", summary["dp_epsilon"], "epsilon", False, how))
        rows.append(_row("delta", summary.get("dp_delta"), "", False, how))
    if options.privacy == "ldp":
        rows += ldp_rows(options, summary)
    return rows


def ldp_rows(options: FLOptions, summary: dict[str, Any]) -> list[dict]:
    """Local DP: epsilon per round and over the rounds each site took part in (sensitivity 2C,
    analytic Gaussian, exact composition; cross-checked with dp_accounting in the tests)."""
    from backends.fl.privacy import calibrate_std, composed_epsilon

    o = options
    std = calibrate_std(o.ldp_epsilon, o.ldp_delta, o.clip)
    releases = max([int(r.get("round", 0)) for r in summary.get("rounds", [])] or [o.rounds])
    total = composed_epsilon(std, o.clip, releases, o.ldp_delta)
    how = (f"site-level local DP of a site's updates: clip {o.clip:g}, sensitivity "
           f"{2 * o.clip:g} (2 x clip), noise std {std:.4g} (analytic Gaussian, CSPRNG)")
    return [_row("epsilon", total, "epsilon", False,
                 f"{how}; composed over {releases} rounds (GDP, exact)"),
            _row("delta", o.ldp_delta, "", False, f"{how}; the same delta per round and in total"),
            _row("ldp_noise_std", std, "", None, how)] + [
            _row("epsilon", composed_epsilon(std, o.clip, r, o.ldp_delta), "epsilon", False,
                 f"{how}; after round {r}", round=r) for r in range(1, releases + 1)]
