"""Where a run's backend configurations execute: `local` (one watched worker process after
another on this machine, the default) or `ray` (configurations and image shards fanned out
over a Ray cluster, merged back into one run folder)."""

from __future__ import annotations

from dataclasses import dataclass

from suite.errors import SuiteError

EXECUTORS = ("local", "ray")
DEFAULT_SLOT_RESOURCE = "suite_slot"


@dataclass(frozen=True)
class ExecutorSpec:
    """How to execute, chosen on the command line (not part of the config: where a run
    executes does not change what it measures, so the config hash and --resume ignore it)."""

    kind: str = "local"
    address: str | None = None          # ray: cluster address; None: RAY_ADDRESS or "auto"
    shards: int | None = None           # ray: shards per inference configuration (default: slots)
    slot_resource: str | None = DEFAULT_SLOT_RESOURCE   # ray: one measured job per unit; None: CPUs

    def __post_init__(self) -> None:
        if self.kind not in EXECUTORS:
            raise SuiteError(f"--executor must be one of {', '.join(EXECUTORS)}, got '{self.kind}'")
        if self.kind == "local" and (self.address or self.shards):
            raise SuiteError("--ray-address and --shards need --executor ray")

    def describe(self) -> dict:
        return {"kind": self.kind, "address": self.address, "shards": self.shards,
                "slot_resource": self.slot_resource}
