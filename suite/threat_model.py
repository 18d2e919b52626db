"""What a backend protects, from whom, and on what assumptions.

Every leaderboard number carries these fields, so a reader never sees a latency
without the guarantee it bought.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

ASSETS = ("input_images", "model_weights", "training_membership", "predictions")
GUARANTEES = ("none", "cryptographic", "differential_privacy", "simulated_hardware", "data_locality",
              "composite")


@dataclass(frozen=True)
class ThreatModel:
    protects: tuple[str, ...]          # subset of ASSETS
    from_whom: str                     # e.g. "model owner (vendor)"
    adversary: str                     # e.g. "semi-honest, non-colluding"
    parties: tuple[str, ...]           # who takes part, e.g. ("data owner", "model owner")
    trust_assumptions: tuple[str, ...]
    guarantee_kind: str                # one of GUARANTEES
    guarantee: str                     # the guarantee in words, with its parameters
    leaks: tuple[str, ...]             # what is revealed anyway
    protected_scope: str               # which part of the model ran under protection
    simulated: bool = False            # True when any part (e.g. TEE hardware) is simulated
    notes: str = ""

    def __post_init__(self) -> None:
        bad = [a for a in self.protects if a not in ASSETS]
        if bad:
            raise ValueError(f"unknown protected asset(s) {bad}; use {ASSETS}")
        if self.guarantee_kind not in GUARANTEES:
            raise ValueError(f"unknown guarantee kind '{self.guarantee_kind}'; use {GUARANTEES}")

    def missing_fields(self) -> list[str]:
        """Fields left empty; the conformance test demands none (but `protects` may be empty)."""
        optional = {"protects", "notes", "simulated", "leaks"}
        return [f.name for f in fields(self) if f.name not in optional and not getattr(self, f.name)]


def compose(trained_by: ThreatModel, served_by: ThreatModel, trainer: str, server: str) -> ThreatModel:
    """A model trained by one technique and served by another (e.g. DP-SGD, then MPC): each
    guarantee covers its own asset, under its own assumptions; together they hold only if
    every assumption of both holds, and the union of what each leaks is leaked."""
    def tag(who: str, items: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(f"{who}: {item}" for item in items)

    protects = tuple(dict.fromkeys(trained_by.protects + served_by.protects))
    return ThreatModel(
        protects=protects,
        from_whom=f"training ({trainer}): {trained_by.from_whom}; serving ({server}): {served_by.from_whom}",
        adversary=f"training: {trained_by.adversary}; serving: {served_by.adversary}",
        parties=tuple(dict.fromkeys(trained_by.parties + served_by.parties)),
        trust_assumptions=tag(trainer, trained_by.trust_assumptions) + tag(server, served_by.trust_assumptions),
        guarantee_kind="composite",
        guarantee=f"training ({trainer}): {trained_by.guarantee} | serving ({server}): {served_by.guarantee}",
        leaks=tag(trainer, trained_by.leaks) + tag(server, served_by.leaks),
        protected_scope=f"training: {trained_by.protected_scope}; serving: {served_by.protected_scope}",
        simulated=trained_by.simulated or served_by.simulated,
        notes=f"composition: the model {trainer} released, served through {server}",
    )
