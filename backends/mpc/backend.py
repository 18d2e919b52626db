"""The registered `mpc` entry: one leaderboard name, two engines chosen by `engine=`."""

from __future__ import annotations

from backends.mpc.crypten_engine import CrypTenBackend
from backends.mpc.spu_engine import SPUBackend
from suite.backend import Backend, BackendOptions
from suite.errors import SuiteError

ENGINES: dict[str, type[Backend]] = {"crypten": CrypTenBackend, "spu": SPUBackend}


class MPCBackend(CrypTenBackend):
    """Two-party secure inference; `engine=crypten` (default) or `engine=spu`."""

    conformance_variants = ({}, {"engine": "spu", "protocol": "semi2k"}, {"engine": "spu", "protocol": "cheetah"})

    @classmethod
    def implementation(cls, options: BackendOptions) -> type[Backend]:
        engine = getattr(options, "engine", "crypten")
        if engine not in ENGINES:
            raise SuiteError(f"mpc option engine must be one of {', '.join(ENGINES)}, got '{engine}'")
        return ENGINES[engine]
