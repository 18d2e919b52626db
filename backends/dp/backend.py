"""Differential privacy: the classifier trained with DP-SGD (Opacus), an epsilon sweep with
its controls, and a measured membership-inference audit of every trained model.

One `dp` entry expands into one leaderboard row per configuration:

    dp[target_epsilon=1.0], dp[target_epsilon=3.0], dp[target_epsilon=8.0]   DP-SGD
    dp[target_epsilon=inf]    non-private control (same recipe, no clipping, no noise)
    dp[noise=False]           clipping-only control (per-sample clipping, noise multiplier 0)

Every configuration trains the same architecture from the same initial weights on the same
Poisson-sampled batches with the same optimiser; only the gradient treatment differs
(`backends.dp.training`). The private rows and the clipping control are compared with the
non-private control (their `reference()`), so delta-AUROC is the cost of DP itself; the
non-private control is compared with `plaintext`, the suite's model.

Scopes:
  head   (default, cheap) re-initialise the classifier head and train only it, with DP-SGD,
         on the frozen backbone of the suite's model. In this demo that backbone was trained
         WITHOUT DP on the same training images, so the guarantee covers the head only and
         the released model as a whole is not DP for those images (said in the threat model).
         Cost on the synthetic default (2100 train / 700 test images, 64 px): about 9 s of CPU
         per configuration including process start-up, 12-16 s wall on a busy two-core box,
         so the default entry's five configurations take about a minute.
  full   train the whole DenseNet from random initialisation (BatchNorm -> GroupNorm via
         Opacus' ModuleValidator.fix; suite.training.Recipe's epochs, batch and learning rate,
         halved epochs with --quick): the guarantee covers every parameter. The real
         experiment: about 15-25 s per non-private and 40-90 s per DP configuration on the
         synthetic default (one thread, busy box); no LiRA shadows unless asked for.

Privacy audit: `fit` keeps a random `audit_fraction` of the training patients out of training
(non-members) and draws as many training images (members); `extra_rows` then runs a
loss-threshold attack and LiRA-lite (shadow models trained the same way) against the trained
model (`backends.audits.membership`). The audit is evaluation, not part of the technique's cost: it runs in
`extra_rows`, after the harness's timed phases, like the AUROC the harness computes.

Accounting: Opacus' RDP accountant by default (`accountant=prv` for the PRV accountant) for
the Poisson-subsampled Gaussian mechanism; delta defaults to 1 / (10 n) with n the number of
images DP-SGD trains on. Opacus' noise and sampling use torch's PRNG (secure_mode off): fine
for measurement, not for a production release.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np

from suite.backend import Backend, BackendContext, BackendOptions, BatchMeta
from suite.errors import SuiteError
from suite.threat_model import ThreatModel

SCOPES = ("head", "full")
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
    grad_sample_mode: str = "auto"      # auto (= hooks) | hooks | functorch | ew | ghost
    accountant: str = "rdp"             # rdp | prv
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
    test_options = {"target_epsilon": 3.0, "epochs": 2, "batch_size": 32, "mia_shadows": 2}

    def __init__(self, options: DPOptions | None = None) -> None:
        super().__init__(options)
        _check(self.options)
        self._report = None
        self._audit = None
        self._rows: list[dict] | None = None

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
        control compares with `plaintext` (the suite's model)."""
        if self.regime == "none":
            return "plaintext"
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
        if head:
            scope = ("classifier head only (a linear layer, re-initialised and trained on frozen "
                     "backbone features); the backbone is the suite's plaintext model, trained "
                     "WITHOUT DP on the same training images in this demo")
        else:
            scope = ("every parameter of the DenseNet (BatchNorm replaced by GroupNorm), trained "
                     "from random initialisation")
        parties = ("data curator (hospital) that trains the model",
                   "recipients of the trained model (model owner, users, the public)")
        from_whom = "anyone who sees the trained model: the model owner, its users, the public"
        adversary = "arbitrary post-processing of the released model (weights and outputs), any side knowledge"
        trust = ("the curator runs the training code as written and keeps gradients, noise and "
                 "data private",
                 "Opacus noise and Poisson sampling use torch's PRNG (secure_mode off): a "
                 "measurement, not a production release",
                 "hyperparameters and architecture are public; the defaults were picked on "
                 "synthetic data (tuning them on the private images would spend privacy too)")
        head_leak = ("training membership through the backbone: it was trained without DP on the "
                     "same training images in this demo, so the released model as a whole has "
                     "NO DP guarantee for them; the (ε, δ) bound covers the head's "
                     "parameters only",) if head else ()
        if regime == "dp":
            guarantee = (f"(ε={o.target_epsilon:g}, δ={delta})-DP w.r.t. adding/removing one "
                         "training image (example-level, not patient-level unless one image per "
                         "patient), " + ("classifier head only: the backbone is not private"
                                         if head else "all parameters")
                         + f"; {o.accountant.upper()} accountant")
            return ThreatModel(
                protects=("training_membership",), from_whom=from_whom, adversary=adversary,
                parties=parties, trust_assumptions=trust,
                guarantee_kind="differential_privacy", guarantee=guarantee,
                leaks=head_leak + ("the number of training images, label set and hyperparameters",
                                   "membership and attributes up to the (ε, δ) bound"),
                protected_scope=scope,
                notes=("scope=head: the DP guarantee covers the head only; use scope=full for a "
                       "model-level guarantee. The audit's members and non-members were all in "
                       "the backbone's training set, so it measures the head's leakage only."
                       if head else
                       "model-level guarantee; the audit figures are empirical lower bounds."))
        if regime == "clip":
            return ThreatModel(
                protects=(), from_whom="nobody (control)", adversary=adversary, parties=parties,
                trust_assumptions=trust, guarantee_kind="none",
                guarantee=("none: per-sample gradient clipping bounds each image's influence per "
                           "step, but without noise there is no DP guarantee (control isolating "
                           "the cost of clipping)"),
                leaks=("training membership (see the audit rows)",),
                protected_scope="nothing (trained parameters: " + scope + ")",
                notes="clipping-only control of the dp sweep; identical recipe, noise multiplier 0")
        return ThreatModel(
            protects=(), from_whom="nobody (control)", adversary=adversary, parties=parties,
            trust_assumptions=trust, guarantee_kind="none",
            guarantee="none: non-private control of the dp sweep (no clipping, no noise)",
            leaks=("training membership (see the audit rows)",),
            protected_scope="nothing (trained parameters: " + scope + ")",
            notes="non-private control: identical recipe, architecture and batches as the DP rows")

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
        # hooks: Opacus' default and, on this DenseNet, within 10% of the fastest mode (ew,
        # benchmarks/bench_dp.py); ew fails on Poisson batches under 32 images (torch's
        # ExpandedWeights grouped-conv path cannot take DenseNet's non-contiguous gradients)
        self.mode = "hooks" if o.grad_sample_mode == "auto" else o.grad_sample_mode

    def _inputs(self, images: np.ndarray):
        """What the trained module consumes: backbone features (head) or images (full)."""
        import torch

        from backends.dp.training import batched

        if self.options.scope == "head":
            return batched(self.ctx.model.net.features2, images, 64)
        return torch.from_numpy(np.ascontiguousarray(images))

    def _new_module(self, n_in: int, n_labels: int, seed: int):
        import torch

        from backends.dp.training import DenseNetLogits, make_opacus_compatible
        from suite.models import build_densenet

        torch.manual_seed(seed)
        if self.options.scope == "head":
            return torch.nn.Linear(n_in, n_labels)
        net = build_densenet(self.ctx.model.architecture, n_labels)
        return DenseNetLogits(make_opacus_compatible(net))

    def _config(self, seed: int, noise_seed: int, noise_multiplier: float):
        from backends.dp.training import TrainConfig

        o = self.options
        return TrainConfig(
            epochs=self.epochs, batch_size=self.train_batch, lr=self.lr, privacy=self.regime,
            max_grad_norm=o.max_grad_norm, noise_multiplier=noise_multiplier, delta=self.delta,
            accountant=o.accountant, grad_sample_mode=self.mode,
            augment=o.scope == "full", seed=seed, noise_seed=noise_seed)

    def _fit_threads(self) -> int:
        """scope=head works on small tensors (one backbone pass at batch 64, a linear layer):
        one thread is as fast on an idle two-core machine and several times faster on a busy
        one, where two OpenMP threads wait on each other. scope=full uses the harness's count."""
        return 1 if self.options.scope == "head" else max(1, self.ctx.threads)

    def _train(self, x, y, seed: int, noise_seed: int, noise_multiplier: float):
        from backends.dp.training import train

        module = self._new_module(x.shape[1] if x.ndim == 2 else 0, y.shape[1], seed)
        report = train(module, x, y, self._config(seed, noise_seed, noise_multiplier))
        return module, report

    def fit(self, train, ctx: BackendContext) -> None:
        with _threads(self._fit_threads()):
            self._fit(train, ctx)

    def _fit(self, train, ctx: BackendContext) -> None:
        import torch

        from backends.dp.training import noise_for_epsilon, steps_and_rate

        o = self.options
        rng = np.random.default_rng(ctx.seed + 101)
        train_idx, members, holdout = audit_split(train.patient_ids, o.audit_fraction, rng)
        x_all = self._inputs(train.images)
        y_all = torch.from_numpy(np.ascontiguousarray(train.labels, dtype=np.float32))
        x, y = x_all[train_idx], y_all[train_idx]
        self.n_private = len(train_idx)
        self.delta = o.delta if o.delta is not None else 1.0 / (10 * self.n_private)
        steps, rate = steps_and_rate(self.n_private, self.train_batch, self.epochs)
        self.sigma = 0.0
        if self.regime == "dp":
            self.sigma = noise_for_epsilon(o.target_epsilon, self.delta, rate, steps, o.accountant)
        self.module, self._report = self._train(x, y, ctx.seed, ctx.seed + 17, self.sigma)
        # audit material: members are training images, holdout images were never trained on
        self._audit = {"x_all": x_all, "y_all": y_all, "train_idx": train_idx,
                       "members": members, "holdout": holdout}

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
        """Nothing runs outside this process; the trained model and audit split stay in memory
        for `extra_rows` (the worker asks for them after teardown)."""

    def versions(self) -> dict[str, str]:
        from importlib.metadata import PackageNotFoundError, version

        out = {}
        for pkg in ("torch", "opacus", "dp-accounting"):
            try:
                out[pkg] = version(pkg)
            except PackageNotFoundError:
                pass
        return out

    # ------------------------------------------------------------ figures and audit

    def run_audit(self) -> list:
        """Loss-threshold attack and (when shadows > 0) LiRA-lite against the trained model."""
        import torch

        from backends.audits import membership as mia
        from backends.dp.training import per_sample_loss

        a = self._audit
        if a is None or len(a["holdout"]) == 0 or len(a["members"]) == 0:
            return []
        x_all, y_all = a["x_all"], a["y_all"]
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
                shadow, _ = self._train(x_all[idx], y_all[idx], seed + 1000 + k, seed + 2000 + k,
                                        self.sigma)
                with torch.inference_mode():
                    stats.append(mia.logit_confidence(self._logits(shadow, x_all[pool]).numpy(),
                                                      y_all[pool].numpy()))
            scores = mia.lira_scores(target_stat, np.stack(stats), in_mask)
            out.append(mia.attack_summary("lira", scores[:m], scores[m:], self.delta, seed=seed))
        return out

    def extra_rows(self) -> list[dict]:
        if self._rows is not None:
            return self._rows
        r, o = self._report, self.options
        if r is None:
            return []
        acc_note = (f"Opacus {o.accountant.upper()} accountant, Poisson-subsampled Gaussian, "
                    f"{r.steps} steps at sampling rate {r.sample_rate:.4g}")
        rows = []

        def add(metric, value, unit="", hib=None, note=None, **kw):
            rows.append({"metric": metric, "value": value, "unit": unit, "higher_is_better": hib,
                         "note": note, **kw})

        if self.regime == "dp":
            add("target_epsilon", o.target_epsilon, "epsilon", False, "requested budget")
            add("epsilon", r.epsilon, "epsilon", False, "achieved: " + acc_note)
        add("delta", r.delta, "", False,
            "given" if o.delta is not None else f"1/(10n), n = {self.n_private} training images")
        add("noise_multiplier", r.noise_multiplier, "", None,
            "Gaussian noise std / max_grad_norm" + ("; 0 in this control" if self.regime != "dp" else ""))
        if self.regime != "none":
            add("max_grad_norm", r.max_grad_norm, "", None, "per-sample L2 clipping norm (flat)")
        add("sampling_rate", r.sample_rate, "", None, "Poisson sampling rate q (expected batch / n)")
        add("steps", r.steps, "steps", None, f"{self.epochs} epochs, expected batch {r.expected_batch_size}")
        add("n_train_private", self.n_private, "images", None,
            "images trained on (training split minus the audit hold-out)")
        add("final_train_loss", r.losses[-1] if r.losses else None, "", False, "mean loss, last epoch")
        try:
            with _threads(self._fit_threads()):
                attacks = self.run_audit()
        except Exception as exc:  # noqa: BLE001 - a failed audit must show, not vanish
            add("mia_auroc", None, "", False, "membership-inference audit failed",
                status="failed", error=f"{type(exc).__name__}: {exc}")
            attacks = []
        for s in attacks:
            prefix = "mia_" if s.attack == "loss_threshold" else f"mia_{s.attack}_"
            what = ("loss-threshold attack (score = -loss)" if s.attack == "loss_threshold" else
                    f"LiRA-lite, online, fixed variance, {self.shadows} shadow models")
            n = s.n_members + s.n_nonmembers
            pop = f"{s.n_members} training images vs {s.n_nonmembers} held-out images"
            add(prefix + "auroc", s.auroc, "", False, f"{what}; {pop}",
                ci_low=s.auroc_ci_low, ci_high=s.auroc_ci_high, ci_method="delong", n=n)
            add(prefix + "tpr_at_1pct_fpr", s.tpr_at_1pct_fpr, "fraction", False, f"{what}; {pop}", n=n)
            add(prefix + "eps_lower_bound", s.eps_lower_bound, "epsilon", None,
                f"{what}: empirical lower bound max(log((TPR-delta)/FPR), log((TNR-delta)/FNR)) "
                "with Clopper-Pearson 95% limits, threshold chosen on a disjoint half; "
                f"at most {s.eps_lower_bound_max:.2f} certifiable with {pop}",
                ci_method="clopper-pearson", n=n)
        self._rows = rows
        return rows


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
