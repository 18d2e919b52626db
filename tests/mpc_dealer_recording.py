"""Tests only: run the triple dealer (`backends.mpc.crypten_party dealer ...`) and record what
it sends, so a capture of the network can be searched for the dealer's secret material.

    python tests/mpc_dealer_recording.py OUT.pkl dealer --master-addr A --master-port P

Records every 256-bit key it makes (backends.mpc.csprng.new_key: the per-party keys it sends
each party, and its own seed-exchange keys) and samples of every tensor it sends (the triple
shares it broadcasts to party 0), as {"keys": [bytes], "sent": [bytes]}; written at exit.
"""

from __future__ import annotations

import atexit
import pickle
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SAMPLE = 64           # bytes taken from the start and the middle of each tensor sent
MAX_TENSORS = 400


def main() -> int:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    import torch.distributed as dist

    import backends.mpc.csprng as csprng
    from backends.mpc import crypten_party

    record = {"keys": [], "sent": []}
    atexit.register(lambda: out.write_bytes(pickle.dumps(record)))
    new_key = csprng.new_key

    def recorded_key() -> bytes:
        key = new_key()
        record["keys"].append(key)
        return key

    csprng.new_key = recorded_key

    def sample(tensor) -> None:
        if len(record["sent"]) >= MAX_TENSORS:
            return
        raw = tensor.detach().contiguous().cpu().numpy().tobytes()
        for start in (0, (len(raw) // 2) // 8 * 8):
            piece = raw[start:start + SAMPLE]
            if len(piece) >= 16:
                record["sent"].append(piece)

    def wrap(name: str, is_source):
        orig = getattr(dist, name)

        def sending(tensor, *args, **kwargs):
            if is_source(args, kwargs):
                sample(tensor)
            return orig(tensor, *args, **kwargs)

        setattr(dist, name, sending)

    def dealer_is_src(args, kwargs):
        src = kwargs.get("src", args[0] if args else None)
        return src == dist.get_rank()

    wrap("broadcast", dealer_is_src)
    wrap("isend", lambda args, kwargs: True)
    wrap("send", lambda args, kwargs: True)
    return crypten_party.main(argv)


if __name__ == "__main__":
    sys.exit(main())
