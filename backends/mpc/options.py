"""Options of the `mpc` entry (both engines; each engine rejects the other's keys)."""

from __future__ import annotations

from dataclasses import dataclass

from suite.backend import BackendOptions


@dataclass
class MPCOptions(BackendOptions):
    batch_size: int = 8
    max_images: int = 64
    precision_bits: int = 0            # 0 = chosen by the model owner from calibration
    triples: str = "ttp"
    pre_mode: str = "split"
    relu: str = "packed"
    truncation: str = "exact"
    scaling: str = "channels"          # crypten: channels (per-channel power-of-two rescaling) | none
    threads: int = 0
    reveal_to: str = "data_owner"
    master_addr: str = ""
    master_port: int = 0
    local_parties: str = "all"
    timeout_s: float = 900.0
    dealer_host: str = "third_party"   # crypten ttp: who hosts the dealer (third_party | model_owner | data_owner)
    channel: str = "plain"            # across hosts: plain (gloo's TCP) | tls-vpn (backends/mpc/tunnel.py)
    rng: str = "csprng"                # crypten: csprng (AES-256-CTR) | torch (stock MT19937: insecure)
    # engine=spu (backends/mpc/spu_engine.py): SecretFlow SPU parties in .venv-spu/
    engine: str = "crypten"
    protocol: str = ""                 # spu: semi2k (default) | cheetah; crypten: must stay ""
    field: str = ""                    # spu: FM64 (default) | FM128
    fxp_fraction_bits: int = 0         # spu: fixed-point fractional bits (0 = SPU's default)
    data_owner_addr: str = ""          # spu: the data owner's link address (default master_addr)
    data_owner_port: int = 0           # spu: its link port (default: a free one)
