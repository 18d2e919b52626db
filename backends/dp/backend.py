"""Differential privacy: the classifier trained with DP-SGD (Opacus) on the hospitals'
training images, an epsilon sweep with its controls, and a membership-inference audit.

One `dp` entry expands into one leaderboard row per configuration:

    dp[target_epsilon=1.0], dp[target_epsilon=3.0], dp[target_epsilon=8.0]   DP-SGD
    dp[target_epsilon=inf]    non-private control (same recipe, no clipping, no noise)
    dp[noise=False]           clipping-only control (per-sample clipping, noise multiplier 0)

Every configuration of an entry spends the same training budget: the same architecture and
starting weights, the same epochs x Poisson steps x expected batch over the same private
images, the same optimiser; only the gradient treatment differs (`backends.dp.training`).
The private rows and the clipping control are compared with the non-private control (their
`reference()`); the non-private control is the comparison itself and has no reference (its
weights are not the suite's model's, so agreement with `plaintext` would mean nothing).

Which data trained which parameters (`suite.data.roles`):
  scope=head (default)  the backbone (`features`) is the vendor's model, trained in the clear
         on the vendor's own images only, never on a hospital's; it is frozen. The classifier
         head starts from the vendor's head and is trained with DP-SGD on the hospitals'
         pooled training split. Every parameter that saw a hospital image is therefore DP
         w.r.t. those images: the guarantee holds for the whole released model. The backbone's
         features of the training images are extracted once (`prepare_fit`, timed as setup,
         cached on disk by backbone weights + image bytes, so the sweep's other rows load
         them); DP-SGD of the head runs in closed form (grad_sample_mode=linear,
         `backends.dp.linear_head`).
  scope=full  every parameter of the DenseNet (BatchNorm -> GroupNorm via Opacus'
         ModuleValidator.fix) from random initialisation with DP-SGD on the hospitals' split;
         the vendor's data is not used. suite.training.Recipe's epochs, batch and learning rate
         (halved epochs with --quick); no LiRA shadows unless asked for.

What is timed (like with like): `prepare_fit` (counted by the harness as setup) does the
work that is not training: the backbone features (head), the audit split, the noise
calibration to the target epsilon, the planned mechanism's epsilon and its PLD cross-check
(all functions of sigma, q, steps and delta, fixed before the first step). fit_time is the
training steps alone, for the DP rows and their controls alike, so "x ctrl" compares
training steps over the same budget; `fit` refuses a run whose steps differ from the plan.

Privacy unit (`level`): `patient` (default) samples patients and takes one image per sampled
patient per batch, so (epsilon, delta) covers adding or removing a whole patient; `image`
samples images (example-level). On the synthetic phantoms every patient has one image and
the two coincide; on real data (NIH: several films per patient) they differ.

Randomness (`secure_mode`, default on): Poisson sampling, the per-patient image choice and the
noise come from the OS CSPRNG for every configuration of the entry, so the run's published
seed does not regenerate them; `secure_mode=false` uses seeded streams (tests, debugging).
`benchmarks/bench_dp.py` measures what secure mode costs.

Accounting: Opacus' RDP accountant by default (`accountant=prv` for the PRV accountant) for
the Poisson-subsampled Gaussian mechanism, and, every run, Google's dp_accounting PLD as an
independent cross-check (a disagreement beyond tolerance fails the configuration). delta
defaults to 1 / (10 n), n the number of private units (patients or images).

Privacy audit (`audit`, run and timed by the harness as its own phase): `fit` keeps a random
`audit_fraction` of the training patients out of training (non-members) and draws as many
training images (members); the loss-threshold attack and LiRA-lite (shadow models trained
the same way, seeded: they are the auditor's) are run against the trained model
(`backends.audits.membership`). Members and non-members are hospital images no parameter of
the model saw outside DP-SGD, so the audit measures the released model as a whole.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np

from suite.backend import Backend, BackendContext, BackendOptions, BatchMeta
from suite.errors import SuiteError
from suite.threat_model import ThreatModel

SCOPES = ("head", "full")
LEVELS = ("patient", "image")
CROSSCHECK_TOLERANCE = 0.05   # PLD epsilon may sit at most 5% above Opacus' (RDP is an upper bound)
# Defaults when epochs / batch_size / lr are not given. `full` uses the suite's plaintext
# recipe (suite.training.Recipe; half the epochs with --quick); `head` trains a linear layer
# on frozen features, which wants larger steps and batches (chosen on the synthetic default).
HEAD_DEFAULTS = {"epochs": 20, "batch_size": 256, "lr": 0.05}
DEFAULT_SHADOWS = {"head": 8, "full": 0}
QUICK_SHADOWS = 4


@dataclass
class DPOptions(BackendOptions):
    # None: this entry is the sweep below plus the two controls (see `expand`)
    target_epsilon: float | None = None
    sweep: tuple[float, ...] = (1.0, 3.0, 8.0)
    noise: bool = True                  # False: clipping-only control (noise multiplier 0)
    delta: float | None = None          # None: 1 / (10 n), n = images trained on
    max_grad_norm: float = 1.0
    epochs: int | None = None           # None: scope default
    batch_size: int | None = None       # expected Poisson batch size of DP-SGD (not predict)
    lr: float | None = None
    scope: str = "head"                 # head | full
    grad_sample_mode: str = "auto"      # auto (head: linear, full: ew) | hooks | functorch | ew | ghost | linear
    accountant: str = "rdp"             # rdp | prv
    level: str = "patient"              # privacy unit: patient (one image per patient per batch) | image
    secure_mode: bool = True            # CSPRNG sampling and noise (False: seeded, for tests)
    audit_fraction: float = 0.2         # training patients held out as audit non-members
    mia_shadows: int | None = None      # LiRA shadow models; None: 8 for head (quick: 4), 0 for full


def _check(o: DPOptions) -> None:
    from backends.dp.training import ACCOUNTANTS, GRAD_SAMPLE_MODES

    def bad(key, why):
        raise SuiteError(f"backend 'dp' option '{key}' {why}")

    if o.scope not in SCOPES:
        bad("scope", f"must be one of {', '.join(SCOPES)}, got '{o.scope}'")
    if o.grad_sample_mode not in ("auto", *GRAD_SAMPLE_MODES):
        bad("grad_sample_mode", f"must be auto or one of {', '.join(GRAD_SAMPLE_MODES)}")
    if o.grad_sample_mode == "linear" and o.scope != "head":
        bad("grad_sample_mode", "'linear' is the closed form for a linear head: needs scope=head")
    if o.level not in LEVELS:
        bad("level", f"must be one of {', '.join(LEVELS)}, got '{o.level}'")
    if o.accountant not in ACCOUNTANTS:
        bad("accountant", f"must be one of {', '.join(ACCOUNTANTS)}")
    if o.target_epsilon is not None and not o.target_epsilon > 0:
        bad("target_epsilon", f"must be > 0 (inf = non-private control), got {o.target_epsilon}")
    if any(not float(e) > 0 for e in o.sweep):
        bad("sweep", f"values must be > 0, got {o.sweep}")
    if o.delta is not None and not 0 < o.delta < 1:
        bad("delta", f"must be in (0, 1), got {o.delta}")
    if not o.max_grad_norm > 0:
        bad("max_grad_norm", "must be > 0")
    if not 0 <= o.audit_fraction < 1:
        bad("audit_fraction", "must be in [0, 1)")
    if o.mia_shadows is not None and (o.mia_shadows < 0 or o.mia_shadows % 2):
        bad("mia_shadows", "must be 0 or an even number >= 2")


@contextmanager
def _threads(n: int):
    """Run torch on `n` threads inside the block."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class DPBackend(Backend):
    name = "dp"
    track = "training"
    extra = "dp"
    requires = ("opacus", "dp_accounting")
    Options = DPOptions
    tolerance = None
    default_batch_size = 32
    test_options = {"target_epsilon": 3.0, "epochs": 2, "batch_size": 32, "mia_shadows": 2,
                    "secure_mode": False}
    conformance_variants = ({}, {"scope": "full", "epochs": 1, "mia_shadows": 0}, {"secure_mode": True})

    def __init__(self, options: DPOptions | None = None) -> None:
        super().__init__(options)
        _check(self.options)
        self._report = None
        self._audit = None

    # ------------------------------------------------------------ configurations

    @property
    def regime(self) -> str:
        """none (non-private control) | clip (clipping-only control) | dp."""
        o = self.options
        if not o.noise:
            return "clip"
        if o.target_epsilon is not None and math.isinf(o.target_epsilon):
            return "none"
        return "dp"

    @classmethod
    def expand(cls, options: DPOptions) -> list["Backend"]:
        """The sweep's DP configurations, then the non-private and clipping-only controls."""
        _check(options)
        base = replace(options, sweep=())
        if not options.noise:
            return [cls(replace(base, target_epsilon=math.inf))]
        if options.target_epsilon is not None and math.isinf(options.target_epsilon):
            return [cls(base)]
        epsilons = [options.target_epsilon] if options.target_epsilon is not None else options.sweep
        private = [cls(replace(base, target_epsilon=float(e))) for e in epsilons]
        return private + [cls(replace(base, target_epsilon=math.inf)),
                          cls(replace(base, target_epsilon=math.inf, noise=False))]

    def reference(self) -> "Backend | str | None":
        """DP rows and the clipping control compare with the non-private control; that
        control is the comparison itself (None): its weights are not the suite's model's."""
        if self.regime == "none":
            return None
        return type(self)(replace(self.options, target_epsilon=math.inf, noise=True, sweep=()))

    def config_label(self) -> str:
        """dp[target_epsilon=1.0], dp[target_epsilon=inf], dp[noise=False], plus any other
        option that differs from its default (e.g. dp[scope=full,target_epsilon=3.0])."""
        from suite.backend import format_option as _fmt

        defaults, o = self.Options(), self.options
        skip = {"sweep", "target_epsilon", "noise"}
        items = {k: getattr(o, k) for k in o.__dataclass_fields__
                 if k not in skip and getattr(o, k) != getattr(defaults, k)}
        if self.regime == "clip":
            items["noise"] = False
        else:
            items["target_epsilon"] = o.target_epsilon
        return f"{self.name}[" + ",".join(f"{k}={_fmt(v)}" for k, v in sorted(items.items())) + "]"

    def batch_size(self) -> int:
        """Images per predict call; the `batch_size` option is DP-SGD's training batch."""
        return self.default_batch_size

    # ------------------------------------------------------------ threat model

    def threat_model(self) -> ThreatModel:
        o, regime = self.options, self.regime
        head = o.scope == "head"
        delta = f"{o.delta:g}" if o.delta is not None else "1/(10n)"
        unit = ("one patient (all their images; one image per patient per sampled batch)"
                if o.level == "patient" else "one training image (example-level)")
        if head:
            scope = ("backbone (features): the vendor's model, trained in the clear on the "
                     "vendor's own images only (no hospital image), frozen; classifier head: "
                     "starts from the vendor's head, trained on the hospitals' pooled training "
                     "split" + (" with DP-SGD" if regime == "dp" else ""))
        else:
            scope = ("every parameter of the DenseNet (BatchNorm replaced by GroupNorm): random "
                     "initialisation, trained on the hospitals' pooled training split"
                     + (" with DP-SGD" if regime == "dp" else "") + "; no vendor data")
        parties = ("data curator that pools the hospital sites' training splits and trains",
                   "vendor (model owner): supplies the backbone trained on its own data",
                   "recipients of the trained model (vendor, users, the public)")
        from_whom = "anyone who sees the trained model: the vendor, its users, the public"
        adversary = "arbitrary post-processing of the released model (weights and outputs), any side knowledge"
        rng = ("sampling, image choice and noise from the OS CSPRNG (os.urandom): the run's "
               "published seed does not regenerate them" if o.secure_mode else
               "sampling and noise from SEEDED streams (secure_mode=false): anyone with the run "
               "folder can regenerate the noise; a measurement, not a release")
        trust = ("the curator sees the pooled hospital training images, runs the training code "
                 "as written and keeps gradients, noise and data private (central DP)",
                 rng,
                 "hyperparameters and architecture are public; the defaults were picked on "
                 "synthetic data (tuning them on the private images would spend privacy too)")
        if regime == "dp":
            guarantee = (f"(ε={o.target_epsilon:g}, δ={delta})-DP w.r.t. adding/removing {unit} "
                         "of the hospitals' training split, for the whole released model: "
                         + ("the backbone never saw a hospital image and the head saw them only "
                            "through DP-SGD" if head else "every parameter saw them only through "
                            "DP-SGD") + f"; {o.accountant.upper()} accountant, cross-checked "
                         "with dp_accounting PLD")
            return ThreatModel(
                protects=("training_membership",), from_whom=from_whom, adversary=adversary,
                parties=parties, trust_assumptions=trust,
                guarantee_kind="differential_privacy", guarantee=guarantee,
                leaks=("the number of training units, label set and hyperparameters",
                       "membership and attributes of hospital training images up to the (ε, δ) bound",
                       *(("the vendor's own training images: the backbone is not DP for them "
                          "(they are the vendor's, not the hospitals')",) if head else ()),
                       *(("patients with several images: example-level only, a patient's images "
                          "together get up to k·ε (group privacy)",) if o.level == "image" else ())),
                protected_scope=scope,
                notes=(f"privacy unit: {o.level}. The audit's members and non-members are "
                       "hospital training images the backbone never saw, so it probes the whole "
                       "released model; its figures are empirical lower bounds."))
        control = "clipping-only" if regime == "clip" else "non-private"
        return ThreatModel(
            protects=(), from_whom="nobody (control)", adversary=adversary, parties=parties,
            trust_assumptions=trust, guarantee_kind="none",
            guarantee=(f"none: {control} control of the dp sweep"
                       + (" (per-sample clipping bounds each unit's influence per step, but "
                          "without noise there is no DP guarantee)" if regime == "clip"
                          else " (no clipping, no noise)")),
            leaks=("training membership of the hospital training images (see the audit rows)",),
            protected_scope="nothing (trained: " + scope + ")",
            notes=f"{control} control: the same budget, starting point, batches' distribution "
                  f"and privacy unit ({o.level}) as the DP rows; only the gradient treatment differs")

    # ------------------------------------------------------------ harness calls

    def setup(self, ctx: BackendContext) -> None:
        import torch  # noqa: F401
        import opacus  # noqa: F401  (fail here, clearly, when the extra is missing)

        if self.regime == "dp" and self.options.target_epsilon is None:
            raise SuiteError("dp: target_epsilon is unset; a sweep entry must be expanded "
                             "(the planner does this) or given target_epsilon=...")
        self.ctx = ctx
        o = self.options
        if o.scope == "head":
            self.epochs = o.epochs or HEAD_DEFAULTS["epochs"]
            self.train_batch = o.batch_size or HEAD_DEFAULTS["batch_size"]
            self.lr = o.lr or HEAD_DEFAULTS["lr"]
        else:
            from suite.training import Recipe

            r = Recipe()
            self.epochs = o.epochs or (max(1, r.epochs // 2) if ctx.quick else r.epochs)
            self.train_batch = o.batch_size or r.batch_size
            self.lr = o.lr or r.lr
        shadows = o.mia_shadows
        if shadows is None:
            shadows = min(DEFAULT_SHADOWS[o.scope], QUICK_SHADOWS) if ctx.quick else DEFAULT_SHADOWS[o.scope]
        self.shadows = shadows
        # auto: ew (torch ExpandedWeights) for the whole DenseNet: it computes per-sample
        # gradients instead of, not on top of, the batch gradient, 1.75x the non-private step
        # against 2.0x for hooks (benchmarks/bench_dp.py; convs get contiguous gradients and
        # empty batches a noise-only step, see backends.dp.training). linear for the head:
        # per-sample clipping of a linear layer in closed form (backends.dp.linear_head),
        # 1.2-1.4x the non-private step where Opacus' hooks and ghost modes take 1.9-2.8x.
        auto = "ew" if o.scope == "full" else "linear"
        self.mode = auto if o.grad_sample_mode == "auto" else o.grad_sample_mode

    def prepare_fit(self, train, ctx: BackendContext) -> None:
        """One-off work that is not training, timed by the harness as setup, so fit_time is
        the training steps alone and "× ctrl" compares the steps of this row and its control:

        - scope=head: the frozen vendor backbone's features of the training images, computed
          once per (backbone weights, images) and kept in the run's cache
          (`backbone_features`): the row that extracts them has the larger setup_time, the
          sweep's other rows load them;
        - the training plan (`_plan`): the audit hold-out, delta, steps and sampling rate,
          and, for a DP row, the noise calibration to the target epsilon, the epsilon of the
          planned mechanism under the chosen accountant and its dp_accounting PLD
          cross-check. These depend only on (sigma, q, steps, delta), which are fixed before
          the first step; `fit` checks that the steps it ran are exactly the planned ones."""
        with _threads(self._fit_threads()):
            if self.options.scope == "head":
                self._features = backbone_features(ctx.model.net, train.images, ctx.cache_dir)
            self._plan = self._plan_training(train, ctx)

    def _plan_training(self, train, ctx: BackendContext) -> "TrainingPlan":
        from backends.dp.training import crosscheck_epsilon, epsilon_for, noise_for_epsilon, steps_and_rate

        o = self.options
        rng = np.random.default_rng(ctx.seed + 101)
        train_idx, members, holdout = audit_split(train.patient_ids, o.audit_fraction, rng)
        groups_all = patient_groups(train.patient_ids) if o.level == "patient" else None
        groups = groups_all[train_idx] if groups_all is not None else None
        n_private = len(np.unique(groups)) if groups is not None else len(train_idx)
        delta = o.delta if o.delta is not None else 1.0 / (10 * n_private)
        steps, rate = steps_and_rate(n_private, self.train_batch, self.epochs)
        sigma, epsilon, crosscheck = 0.0, math.inf, None
        if self.regime == "dp":
            sigma = noise_for_epsilon(o.target_epsilon, delta, rate, steps, o.accountant)
            epsilon = epsilon_for(sigma, rate, steps, delta, o.accountant)
            crosscheck = crosscheck_epsilon(sigma, rate, steps, delta)
            check_epsilon(epsilon, crosscheck, o.accountant)
        return TrainingPlan(train=train, train_idx=train_idx, members=members, holdout=holdout,
                            groups_all=groups_all, n_private=n_private, delta=delta, steps=steps,
                            sample_rate=rate, sigma=sigma, epsilon=epsilon, crosscheck=crosscheck)

    def _inputs(self, images: np.ndarray):
        """What the trained module consumes: backbone features (head) or images (full)."""
        import torch

        if self.options.scope == "head":
            cached = getattr(self, "_features", None)
            if cached is not None and len(cached) == len(images):
                return cached
            return backbone_features(self.ctx.model.net, images, None)
        return torch.from_numpy(np.ascontiguousarray(images))

    def _new_module(self, n_in: int, n_labels: int, seed: int):
        """The starting point, identical for every configuration of the entry: the vendor's
        head (scope=head) or a seeded random GroupNorm DenseNet (scope=full)."""
        import copy

        import torch

        from backends.dp.training import DenseNetLogits, make_opacus_compatible
        from suite.models import build_densenet

        torch.manual_seed(seed)
        if self.options.scope == "head":
            head = copy.deepcopy(self.ctx.model.net.classifier)
            if (head.in_features, head.out_features) != (n_in, n_labels):
                raise SuiteError(f"dp: the vendor model's head is {head.in_features}->"
                                 f"{head.out_features}, the data needs {n_in}->{n_labels}")
            return head.train()
        net = build_densenet(self.ctx.model.architecture, n_labels)
        return DenseNetLogits(make_opacus_compatible(net))

    def _config(self, seed: int, noise_seed: int, noise_multiplier: float, secure: bool):
        from backends.dp.training import TrainConfig

        o = self.options
        return TrainConfig(
            epochs=self.epochs, batch_size=self.train_batch, lr=self.lr, privacy=self.regime,
            max_grad_norm=o.max_grad_norm, noise_multiplier=noise_multiplier, delta=self.delta,
            accountant=o.accountant, grad_sample_mode=self.mode,
            augment=o.scope == "full", seed=seed, noise_seed=noise_seed, secure=secure)

    def _fit_threads(self) -> int:
        """scope=head works on small tensors (one backbone pass at batch 64, a linear layer):
        one thread is as fast on an idle two-core machine and several times faster on a busy
        one, where two OpenMP threads wait on each other. scope=full uses the harness's count."""
        return 1 if self.options.scope == "head" else max(1, self.ctx.threads)

    def _train(self, x, y, groups, seed: int, noise_seed: int, noise_multiplier: float,
               secure: bool):
        """Train a fresh module; no epsilon is computed here (the plan has it: `prepare_fit`)."""
        from backends.dp.training import train

        module = self._new_module(x.shape[1] if x.ndim == 2 else 0, y.shape[1], seed)
        report = train(module, x, y, self._config(seed, noise_seed, noise_multiplier, secure),
                       groups=groups, account=False)
        return module, report

    def fit(self, train, ctx: BackendContext) -> None:
        with _threads(self._fit_threads()):
            self._fit(train, ctx)

    def _fit(self, train, ctx: BackendContext) -> None:
        """The training steps alone: everything the plan fixes (calibration, accounting,
        cross-check) was done by `prepare_fit`, outside the timed fit."""
        import torch

        o = self.options
        plan = getattr(self, "_plan", None)
        if plan is None or plan.train is not train:   # fit without prepare_fit (direct use)
            plan = self._plan = self._plan_training(train, ctx)
        x_all = self._inputs(train.images)
        y_all = torch.from_numpy(np.ascontiguousarray(train.labels, dtype=np.float32))
        idx = plan.train_idx
        groups = plan.groups_all[idx] if plan.groups_all is not None else None
        self.n_images, self.n_private, self.delta = len(idx), plan.n_private, plan.delta
        self.sigma = plan.sigma
        self.module, report = self._train(x_all[idx], y_all[idx], groups, ctx.seed, ctx.seed + 17,
                                          self.sigma, o.secure_mode)
        self._report = plan.account(report)
        self.crosscheck = plan.crosscheck
        # audit material: members are training images, holdout images were never trained on
        self._audit = {"x_all": x_all, "y_all": y_all, "groups": plan.groups_all, "train_idx": idx,
                       "members": plan.members, "holdout": plan.holdout}

    def released_model(self):
        """What this row releases, and what a `dp>...` composition serves: the vendor backbone
        with the DP-trained head (scope=head). scope=full trains an Opacus-compatible twin
        (GroupNorm), which the secure-inference engines do not serve: None."""
        import copy
        import dataclasses

        if self.options.scope != "head" or getattr(self, "module", None) is None:
            return None
        net = copy.deepcopy(self.ctx.model.net).eval()
        state = {k.removeprefix("_module."): v for k, v in self.module.state_dict().items()}
        net.classifier.load_state_dict(state)
        return dataclasses.replace(self.ctx.model, net=net, name=f"{self.ctx.model.name}+{self.config_label()}",
                                   source="checkpoint")

    def _logits(self, module, x):
        from backends.dp.training import batched

        return batched(module, x, 64)

    def predict_proba(self, images: np.ndarray, meta: BatchMeta | None = None) -> np.ndarray:
        import torch

        from backends.dp.training import batched

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(images))
            if self.options.scope == "head":
                z = self.module(batched(self.ctx.model.net.features2, x, 64))
            else:
                z = batched(self.module, x, 64)
        return torch.sigmoid(z.double()).numpy()

    def teardown(self) -> None:
        """Nothing runs outside this process; the trained model stays in memory for
        `extra_rows` (the worker asks for them after teardown)."""

    def versions(self) -> dict[str, str]:
        from suite.versions import library_versions

        return library_versions("torch", "opacus", "dp-accounting")

    # ------------------------------------------------------------ audit (harness phase)

    def audit(self, ctx: BackendContext, train, test) -> list[dict]:
        """Membership inference against the trained model, as rows; the harness times this
        phase and records a failure as a failed audit."""
        with _threads(self._fit_threads()):
            attacks = self.run_attacks()
        rows = []
        for s in attacks:
            prefix = "mia_" if s.attack == "loss_threshold" else f"mia_{s.attack}_"
            what = ("loss-threshold attack (score = -loss)" if s.attack == "loss_threshold" else
                    f"LiRA-lite, online, fixed variance, {self.shadows} shadow models")
            n = s.n_members + s.n_nonmembers
            pop = (f"{s.n_members} hospital training images vs {s.n_nonmembers} held-out hospital "
                   "training images (whole patients); the backbone saw neither")
            common = {"phase": "audit", "n": n}
            rows.append(_row(prefix + "auroc", s.auroc, "", False, f"{what}; {pop}",
                             ci_low=s.auroc_ci_low, ci_high=s.auroc_ci_high, ci_method="delong", **common))
            rows.append(_row(prefix + "tpr_at_1pct_fpr", s.tpr_at_1pct_fpr, "fraction", False,
                             f"{what}; {pop}", **common))
            rows.append(_row(prefix + "eps_lower_bound", s.eps_lower_bound, "epsilon", None,
                             f"{what}: empirical lower bound max(log((TPR-delta)/FPR), "
                             "log((TNR-delta)/FNR)) with Clopper-Pearson 95% limits, threshold "
                             f"chosen on a disjoint half; at most {s.eps_lower_bound_max:.2f} "
                             f"certifiable with {pop}", ci_method="clopper-pearson", **common))
        return rows

    def run_attacks(self) -> list:
        """Loss-threshold attack and (when shadows > 0) LiRA-lite against the trained model."""
        import torch

        from backends.audits import membership as mia
        from backends.dp.training import per_sample_loss

        a = self._audit
        if a is None or len(a["holdout"]) == 0 or len(a["members"]) == 0:
            return []
        x_all, y_all, groups = a["x_all"], a["y_all"], a["groups"]
        pool = np.concatenate([a["members"], a["holdout"]])
        m = len(a["members"])
        with torch.inference_mode():
            z = self._logits(self.module, x_all[pool])
            loss = per_sample_loss(z, y_all[pool]).numpy()
        seed = self.ctx.seed
        out = [mia.attack_summary("loss_threshold", mia.loss_scores(loss[:m]),
                                  mia.loss_scores(loss[m:]), self.delta, seed=seed)]
        if self.shadows:
            target_stat = mia.logit_confidence(z.numpy(), y_all[pool].numpy())
            in_mask = mia.balanced_in_mask(self.shadows, len(pool), seed + 211)
            base = np.setdiff1d(a["train_idx"], a["members"])
            stats = []
            for k in range(self.shadows):
                idx = np.concatenate([base, pool[in_mask[k]]])
                shadow, _ = self._train(x_all[idx], y_all[idx],
                                        groups[idx] if groups is not None else None,
                                        seed + 1000 + k, seed + 2000 + k, self.sigma, secure=False)
                with torch.inference_mode():
                    stats.append(mia.logit_confidence(self._logits(shadow, x_all[pool]).numpy(),
                                                      y_all[pool].numpy()))
            scores = mia.lira_scores(target_stat, np.stack(stats), in_mask)
            out.append(mia.attack_summary("lira", scores[:m], scores[m:], self.delta, seed=seed))
        return out

    # ------------------------------------------------------------ figures

    def extra_rows(self) -> list[dict]:
        """What the training spent and guarantees: the shared budget first, then epsilon
        (delta, unit), then the mechanism's parameters."""
        r, o = self._report, self.options
        if r is None:
            return []
        unit = r.unit + ("s" if r.n_units != 1 else "")
        level = f"privacy unit: {r.unit}" + (" (one image per patient per sampled batch)"
                                              if r.unit == "patient" else " (example-level)")
        acc_note = (f"Opacus {o.accountant.upper()} accountant, Poisson-subsampled Gaussian, "
                    f"{r.steps} steps at sampling rate {r.sample_rate:.4g}; {level}")
        budget = (f"training budget shared by every row of this dp entry (DP rows and both "
                  f"controls): {self.epochs} epochs x {r.steps // self.epochs} Poisson steps, "
                  f"expected batch {r.expected_batch_size} of {r.n_units} {unit} "
                  f"({self.n_images} images), lr {self.lr:g}, from the same starting point "
                  f"({'the vendor head on the frozen vendor backbone' if o.scope == 'head' else 'seeded random GroupNorm DenseNet'})")
        rows = [_row("training_budget", r.steps * r.expected_batch_size, "samples", None, budget),
                _row("steps", r.steps, "steps", None, budget)]
        if self.regime == "dp":
            rows.append(_row("epsilon", r.epsilon, "epsilon", False,
                             f"achieved, delta {r.delta:.3g}: {acc_note}"))
            rows.append(_row("epsilon_independent", self.crosscheck, "epsilon", False,
                             f"the same mechanism under Google's dp_accounting PLD accountant "
                             f"(independent check of the epsilon row; delta {r.delta:.3g}; {level})"))
            rows.append(_row("target_epsilon", o.target_epsilon, "epsilon", False, "requested budget"))
        rows.append(_row("delta", r.delta, "", False,
                         "given" if o.delta is not None else f"1/(10n), n = {r.n_units} {unit}"))
        rows.append(_row("noise_multiplier", r.noise_multiplier, "", None,
                         "Gaussian noise std / max_grad_norm" + ("; 0 in this control" if self.regime != "dp" else "")
                         + ("; noise and sampling from the OS CSPRNG" if r.secure
                            else "; SEEDED noise and sampling (secure_mode=false)")))
        if self.regime != "none":
            rows.append(_row("max_grad_norm", r.max_grad_norm, "", None,
                             f"per-sample L2 clipping norm (flat), one clipped gradient per {r.unit} per step"))
        rows.append(_row("sampling_rate", r.sample_rate, "", None,
                         f"Poisson sampling rate q over {unit} (expected batch / n)"))
        rows.append(_row("n_train_private", r.n_units, unit, None,
                         "private units trained on (the hospitals' training split minus the audit hold-out)"))
        rows.append(_row("final_train_loss", r.losses[-1] if r.losses else None, "", False,
                         "mean loss, last epoch"))
        return rows


@dataclass
class TrainingPlan:
    """What one configuration's training will be, fixed before its first step
    (`DPBackend.prepare_fit`): the audit split, the privacy unit count, delta, steps, sampling
    rate, the calibrated noise multiplier, and the planned mechanism's epsilon under the
    row's accountant and under dp_accounting's PLD (None for the controls)."""

    train: object
    train_idx: np.ndarray
    members: np.ndarray
    holdout: np.ndarray
    groups_all: np.ndarray | None
    n_private: int
    delta: float
    steps: int
    sample_rate: float
    sigma: float
    epsilon: float
    crosscheck: float | None

    def account(self, report):
        """The trained run's report with the plan's epsilon, after checking that the run took
        exactly the planned mechanism (steps, sampling rate, noise multiplier, delta): the
        epsilon of (sigma, q, steps) is the same number whether computed before or after."""
        ran = (report.steps, report.sample_rate, report.noise_multiplier, report.delta)
        planned = (self.steps, self.sample_rate, self.sigma, self.delta)
        if ran != planned:
            raise SuiteError(f"dp: the training ran (steps, q, sigma, delta) = {ran}, not the "
                             f"planned {planned}; its epsilon would not be the one accounted")
        return replace(report, epsilon=self.epsilon)


FEATURES_FORMAT = 1


def backbone_features(net, images: np.ndarray, cache_dir=None):
    """`net.features2` (the frozen backbone: features, ReLU, global pooling) over `images`,
    in batches of 64. With `cache_dir`, kept as `dp-features/<key>.pt`, the key covering
    the backbone's weights, the images' bytes and the torch version: the same frozen
    function of the same pixels, so a cached tensor equals a recomputed one."""
    import hashlib
    from pathlib import Path

    import torch

    from backends.dp.training import batched
    from suite.hashing import cache_key

    if cache_dir is None:
        return batched(net.features2, images, 64)
    h = hashlib.sha256()
    for name, tensor in net.state_dict().items():
        if not name.startswith("classifier."):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    pixels = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()
    key = cache_key("dp-backbone-features", FEATURES_FORMAT, h.hexdigest(), pixels,
                    list(images.shape), torch.__version__)
    path = Path(cache_dir) / "dp-features" / f"{key}.pt"
    if path.exists():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:   # torn file: recompute below
            path.unlink(missing_ok=True)
    features = batched(net.features2, images, 64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(features, tmp)
    tmp.replace(path)
    return features


def check_epsilon(reported: float, independent: float, accountant: str = "rdp") -> None:
    """Refuse a reported epsilon the independent accountant finds too optimistic: RDP is an
    upper bound of the near-exact PLD value, so PLD may exceed it only by numerical slack."""
    if not independent <= reported * (1 + CROSSCHECK_TOLERANCE):
        raise SuiteError(
            f"dp: the {accountant.upper()} epsilon {reported:.4f} is below the independent "
            f"dp_accounting PLD epsilon {independent:.4f}: the reported guarantee would be too "
            "optimistic")


def _row(metric, value, unit="", hib=None, note=None, **kw) -> dict:
    return {"metric": metric, "value": value, "unit": unit, "higher_is_better": hib, "note": note, **kw}


def patient_groups(patient_ids: np.ndarray) -> np.ndarray:
    """An integer per image naming its patient (the privacy unit at level=patient)."""
    _, groups = np.unique(np.asarray(patient_ids).astype(str), return_inverse=True)
    return groups


def audit_split(patient_ids: np.ndarray, fraction: float, rng: np.random.Generator):
    """(training rows, member rows, held-out rows) of the training split.

    Whole patients are held out; members are as many training images, drawn at random.
    """
    n = len(patient_ids)
    if fraction <= 0:
        return np.arange(n), np.array([], dtype=int), np.array([], dtype=int)
    patients = np.array(sorted(set(patient_ids.tolist())))
    n_hold = int(round(fraction * len(patients)))
    n_hold = min(max(n_hold, 1), len(patients) - 1)
    held = set(rng.permutation(patients)[:n_hold].tolist())
    is_held = np.array([p in held for p in patient_ids])
    train_idx, holdout = np.flatnonzero(~is_held), np.flatnonzero(is_held)
    members = np.sort(rng.choice(train_idx, size=min(len(holdout), len(train_idx)), replace=False))
    return train_idx, members, holdout
