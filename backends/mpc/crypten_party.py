"""One MPC party (or the triple dealer) as its own OS process.

Party 0 is the model owner: it holds the folded plan's parameters; with the dealer it keeps
the product weights in clear (`plain_weight_ops`, `protocol.TwoPartyGates.plain_product`) and
secret-shares the rest.
Party 1 is the data owner: it holds the images and secret-shares them, and drives the session:
for each batch it announces the batch shape to party 0 over the MPC channel. Party 1 learns
the plan's *shapes* (the architecture) from party 0, never its values. They talk through
CrypTen's torch.distributed ("gloo") communicator. The orchestrator (`backends.mpc.MPCBackend`,
in the benchmark worker) talks to each local party over its own pipe (a socketpair): party 0's
carries its own model at setup and its per-batch reports back; party 1's carries the images
(the hospital's own machine) and the revealed outputs back. A model owner on another machine
runs the same loop without a pipe (`python -m backends.mpc.crypten_party model-owner ...`).

Every collective the communicator performs is counted here (bytes sent and received by
this party, rounds = communication calls, as CrypTen counts them), split into traffic
between the two parties and traffic with the dealer. With `record_dir` set (tests only),
the party also saves everything it receives from the other party, so tests can show that
nothing it received is, or correlates with, the other party's secret.
"""

from __future__ import annotations

import math
import os
import pickle
import sys
import time
import traceback
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from backends.mpc.party_process import peak_rss_bytes, recv, send, watch_parent

ROLES = {0: "model_owner", 1: "data_owner"}
DEALER_RANK = 2


# ------------------------------------------------------------------ traffic accounting

class Traffic:
    """Counters for one party; `snapshot()` and differences give per-phase figures."""

    FIELDS = ("sent", "received", "rounds", "dealer_sent", "dealer_received", "dealer_rounds")

    def __init__(self) -> None:
        self.sent = self.received = self.rounds = 0
        self.dealer_sent = self.dealer_received = self.dealer_rounds = 0
        self.record: list[tuple[str, Any]] | None = None
        self.opened: list[Any] | None = None       # tests: values opened to both parties

    def snapshot(self) -> dict[str, int]:
        return {f: int(getattr(self, f)) for f in self.FIELDS}

    @staticmethod
    def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
        return {k: after[k] - before.get(k, 0) for k in after}


def _nbytes(t: Any) -> int:
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return int(t.nelement() * t.element_size())


def _other_part(result, own, op) -> Any:
    """What the other party contributed to a 2-party reduction (what this party received)."""
    import torch.distributed as dist

    if isinstance(result, (list, tuple)):
        return [_other_part(r, o, op) for r, o in zip(result, own)]
    if op == dist.ReduceOp.BXOR:
        return result ^ own
    return result - own


def install_counters(traffic: Traffic) -> None:
    """Wrap CrypTen's communicator collectives to count (and optionally record) them.

    Patched on the class, in this party process only, before `crypten.init()`, so the
    seed exchange during initialisation is counted too.
    """
    import torch.distributed as dist
    from crypten.communicator import DistributedCommunicator as comm

    def dealer(self, group) -> bool:
        return group is not None and group is not self.main_group

    def keep(name: str, payload: Any) -> None:
        if traffic.record is not None:
            traffic.record.append((name, _detach(payload)))

    def keep_other(name: str, result: Any, own: Any, op: Any) -> None:
        if traffic.record is not None:         # what the other party sent: only when recording
            traffic.record.append((name, _detach(_other_part(result, own, op))))

    def keep_opened(payload: Any) -> None:
        if traffic.opened is not None:
            traffic.opened.append(_detach(payload))

    orig = {n: getattr(comm, n) for n in ("send", "recv", "isend", "irecv", "scatter", "reduce",
                                          "all_reduce", "gather", "all_gather", "broadcast",
                                          "barrier", "send_obj", "recv_obj", "broadcast_obj")}

    def send(self, tensor, dst, *a, **k):
        traffic.sent += _nbytes(tensor)
        traffic.rounds += 1
        return orig["send"](self, tensor, dst, *a, **k)

    def recv(self, tensor, src=None, *a, **k):
        out = orig["recv"](self, tensor, src, *a, **k)
        traffic.received += _nbytes(out)
        traffic.rounds += 1
        keep("recv", out)
        return out

    def isend(self, tensor, dst, *a, **k):
        traffic.sent += _nbytes(tensor)
        traffic.rounds += 1
        return orig["isend"](self, tensor, dst, *a, **k)

    def irecv(self, tensor, src=None, *a, **k):
        traffic.received += _nbytes(tensor)
        traffic.rounds += 1
        return orig["irecv"](self, tensor, src, *a, **k)

    def scatter(self, scatter_list, src, *a, **k):
        out = orig["scatter"](self, scatter_list, src, *a, **k)
        if src == self.get_rank():
            traffic.sent += sum(_nbytes(x) for i, x in enumerate(scatter_list) if i != self.get_rank())
        else:
            traffic.received += _nbytes(out)
            keep("scatter", out)
        traffic.rounds += 1
        return out

    def reduce(self, input, dst, op=dist.ReduceOp.SUM, batched=False):
        out = orig["reduce"](self, input, dst, op=op, batched=batched)
        if dst == self.get_rank():
            traffic.received += _nbytes(input)
            keep_other("reduce", out, input, op)
        else:
            traffic.sent += _nbytes(input)
        traffic.rounds += 1
        return out

    def all_reduce(self, input, op=dist.ReduceOp.SUM, batched=False):
        out = orig["all_reduce"](self, input, op=op, batched=batched)
        traffic.sent += _nbytes(input)
        traffic.received += _nbytes(input)
        traffic.rounds += 1
        keep_other("all_reduce", out, input, op)
        keep_opened(out)               # what both parties learn: the opened value itself
        return out

    def gather(self, tensor, dst):
        out = orig["gather"](self, tensor, dst)
        if dst == self.get_rank():
            others = [t for i, t in enumerate(out) if i != self.get_rank()]
            traffic.received += _nbytes(others)
            keep("gather", others)
        else:
            traffic.sent += _nbytes(tensor)
        traffic.rounds += 1
        return out

    def all_gather(self, tensor):
        out = orig["all_gather"](self, tensor)
        others = [t for i, t in enumerate(out) if i != self.get_rank()]
        traffic.sent += _nbytes(tensor)
        traffic.received += _nbytes(others)
        traffic.rounds += 1
        keep("all_gather", others)
        keep_opened(out)               # both parties see every contribution
        return out

    def broadcast(self, input, src, group=None, batched=False):
        out = orig["broadcast"](self, input, src, group=group, batched=batched)
        n = _nbytes(input)
        if dealer(self, group):
            if src != self.get_rank():
                traffic.dealer_received += n
                keep("dealer_broadcast", out)
        else:
            if src == self.get_rank():
                traffic.sent += n
            else:
                traffic.received += n
                keep("broadcast", out)
            traffic.rounds += 1
        return out

    def barrier(self):
        traffic.rounds += 1
        return orig["barrier"](self)

    def send_obj(self, obj, dst, group=None):
        n = len(pickle.dumps(obj))
        if dealer(self, group):
            traffic.dealer_sent += n
            traffic.dealer_rounds += 1          # one request -> one reply: a round trip
        else:
            traffic.sent += n
            traffic.rounds += 1
        return orig["send_obj"](self, obj, dst, group)

    def recv_obj(self, src, group=None):
        out = orig["recv_obj"](self, src, group)
        n = len(pickle.dumps(out))
        if dealer(self, group):
            traffic.dealer_received += n
        else:
            traffic.received += n
            traffic.rounds += 1
            keep("recv_obj", out)
        return out

    def broadcast_obj(self, obj, src, group=None):
        out = orig["broadcast_obj"](self, obj, src, group)
        n = len(pickle.dumps(out))
        if src == self.get_rank():
            traffic.sent += n
        else:
            traffic.received += n
            keep("broadcast_obj", out)
        traffic.rounds += 1
        return out

    for name, fn in dict(send=send, recv=recv, isend=isend, irecv=irecv, scatter=scatter,
                         reduce=reduce, all_reduce=all_reduce, gather=gather,
                         all_gather=all_gather, broadcast=broadcast, barrier=barrier,
                         send_obj=send_obj, recv_obj=recv_obj,
                         broadcast_obj=broadcast_obj).items():
        fn.__name__ = name
        setattr(comm, name, fn)


def _detach(payload: Any) -> Any:
    import torch

    if isinstance(payload, torch.Tensor):
        return payload.detach().clone()
    if isinstance(payload, (list, tuple)):
        return [_detach(p) for p in payload]
    return payload


# ------------------------------------------------------------------ secure ops

class CrypTenOps:
    """The ops `backends.mpc.plan.run_plan` needs, on CrypTen MPCTensors.

    truncation="exact": every product of two encodings (convolutions, the classifier, "mul"
    pre-activations, the global average) is divided by 2^p with `TwoPartyGates.truncate`,
    which cannot wrap; "local": CrypTen's own local share division (faster, fails with
    probability |y| * 2^(2p-64) per value).
    """

    def __init__(self, crypten: Any, relu: str = "packed", dealer: Any = None,
                 truncation: str = "exact", comparison_bits: int = 64) -> None:
        from backends.mpc.protocol import NARROW_BITS, TwoPartyGates

        self.crypten = crypten
        gates = TwoPartyGates(crypten, dealer) if relu == "packed" or truncation == "exact" else None
        self.gates = gates
        self._relu = gates.relu if relu == "packed" else None
        self._gates = gates if truncation == "exact" else None
        # the model owner's calibrated bound on every ReLU input (not the max-pool's differences,
        # whose padding is -2^20): with the dealer, a 32-bit comparison (`TwoPartyGates.relu`)
        self.narrow = (comparison_bits == NARROW_BITS and gates is not None and relu == "packed"
                       and gates.provider.NAME == "TTP")

    def _product(self, op, x, w, **kwargs):
        """op(x, w) for shared x and shared or plain (model owner's) w, truncated exactly (or by
        CrypTen when truncation=local)."""
        from backends.mpc.protocol import PlainWeight

        if self._gates is None:
            return getattr(x, op)(w, **kwargs)        # CrypTen's own product and local division
        if isinstance(w, PlainWeight):
            product = self._gates.plain_product(x.share, w, **kwargs)
        else:
            product = self._gates.product(op, x.share, w.share, **kwargs)   # carries 2p fractional bits
        y = x.shallow_copy()
        y._tensor = x._tensor.shallow_copy()          # MPCTensor.shallow_copy shares _tensor
        y._tensor.share = self._gates.truncate(product, _fraction_bits(x))
        return y

    def conv(self, x, w, b, stride, padding):
        y = self._product("conv2d", x, w, stride=stride, padding=padding)
        return y if b is None else y + b.view(1, -1, 1, 1)

    def linear(self, x, w, b):
        from backends.mpc.protocol import PlainWeight

        # a plain classifier weight is kept transposed (`plain_weight_ops`)
        return self._product("matmul", x, w if isinstance(w, PlainWeight) else w.transpose(0, 1)) + b

    def relu(self, x):
        return self._relu(x, narrow=True) if self.narrow else self._relu_wide(x)

    def _relu_wide(self, x):
        return self._relu(x) if self._relu is not None else x.relu()

    def maximum_many(self, a_list, b_list):
        """max(a, b) = b + relu(a - b) for every pair, in one batched comparison (full width:
        a difference with the padding is ~2^20)."""
        diffs = [a - b for a, b in zip(a_list, b_list)]
        if len(diffs) == 1:
            return [b_list[0] + self._relu_wide(diffs[0])]
        sizes = [d.nelement() for d in diffs]
        r = self._relu_wide(self.crypten.cat([d.flatten() for d in diffs], dim=0))
        out, start = [], 0
        for b, d, n in zip(b_list, diffs, sizes):
            out.append(b + r[start:start + n].view(d.size()))
            start += n
        return out

    def mul(self, x, s):
        return self._product("mul", x, s)

    def add(self, x, t):
        return x + t

    def cat(self, xs, dim):
        return self.crypten.cat(xs, dim=dim)

    def pad(self, x, dim, p, value):
        pads = [0, 0] * (x.dim() - dim - 1) + [p, p]
        return x.pad(pads, value=value)

    def strided(self, x, dim, start, step, length):
        index = [slice(None)] * x.dim()
        index[dim] = slice(start, start + (length - 1) * step + 1, step)
        return x[tuple(index)]

    def sum_pool2(self, x):
        h, w = x.size(2) // 2 * 2, x.size(3) // 2 * 2
        x = x[:, :, :h, :w]
        return x[:, :, 0::2, 0::2] + x[:, :, 1::2, 0::2] + x[:, :, 0::2, 1::2] + x[:, :, 1::2, 1::2]

    def global_avg(self, x):
        hw = x.size(2) * x.size(3)
        s = x.sum(3).sum(2)
        if hw == 1:
            return s
        if self._gates is None:
            return s.div(hw)                # public integer divisor: local truncation
        bits = _fraction_bits(s)            # multiply by the encoding of 1/hw, truncate exactly
        s._tensor.share = self._gates.truncate(s._tensor.share * round(2 ** bits / hw), bits)
        return s


def plain_weight_ops(plan: Any) -> dict[str, str]:
    """Parameter name -> product op for every parameter that is only ever a product's second
    operand (convolution and classifier weights, "mul" scales): the model owner keeps these in
    clear (`TwoPartyGates.plain_product`); biases and shifts stay secret-shared. The
    classifier's weight is kept transposed, as the matmul's operand."""
    out = {plan.stem.w: "conv2d"}
    pres = [plan.final] + [t.pre for t in plan.transitions]
    for block in plan.blocks:
        for layer in block:
            out[layer.conv1.w] = out[layer.conv2.w] = "conv2d"
            pres.append(layer.pre)
    for t in plan.transitions:
        out[t.conv.w] = "conv2d"
    out[plan.fc_w] = "matmul"
    for pre in pres:
        if pre.mode == "mul":
            out[pre.s] = "mul"
    return out


def _fraction_bits(x: Any) -> int:
    return int(round(math.log2(x.encoder.scale)))


class ProfiledOps:
    """Wraps an ops object and accumulates wall time per op (MPC_PROFILE=1; diagnostics)."""

    def __init__(self, ops: Any) -> None:
        self._ops = ops
        self.seconds: dict[str, float] = {}

    def __getattr__(self, name: str):
        fn = getattr(self._ops, name)
        if not callable(fn):
            return fn

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        return timed


# ------------------------------------------------------------------ process entry points

def _configure(settings: dict[str, Any], rank: int, world_size: int = 2) -> Any:
    """Environment, threads, CrypTen config and a bounded gloo timeout; returns crypten."""
    import torch

    os.environ.update({
        "DISTRIBUTED_BACKEND": "gloo",
        "RENDEZVOUS": f"tcp://{settings['master_addr']}:{settings['master_port']}",
        "WORLD_SIZE": str(world_size),
        "RANK": str(rank),
    })
    torch.set_num_threads(int(settings["threads"]))
    torch.set_num_interop_threads(1)
    import torch.distributed as dist

    from backends.mpc.crypten_compat import import_crypten

    crypten = import_crypten(settings.get("rng", "csprng"))
    crypten.cfg.mpc.provider = "TTP" if settings["triples"] == "ttp" else "TFP"
    # 0 = the data owner adopts the model owner's precision, announced at setup
    crypten.cfg.encoder.precision_bits = int(settings["precision_bits"]) or 16
    crypten.cfg.communicator.verbose = False       # counted by install_counters instead
    # CrypTen passes no timeout to init_process_group; bound every collective so a party
    # whose peer vanished errors out instead of waiting for gloo's 30-minute default.
    original = dist.init_process_group
    timeout = timedelta(seconds=float(settings["timeout_s"]))

    def init_process_group(*args, **kwargs):
        kwargs.setdefault("timeout", timeout)
        return original(*args, **kwargs)

    dist.init_process_group = init_process_group
    _freeze_config(crypten)
    return crypten


class _FrozenNode:
    """Plain-attribute copy of an OmegaConf node (read-only, cheap to read)."""

    def __init__(self, mapping: dict) -> None:
        for key, value in mapping.items():
            object.__setattr__(self, key, _FrozenNode(value) if isinstance(value, dict) else value)

    def __setattr__(self, name, value):
        raise AttributeError("CrypTen's configuration is frozen inside an MPC party")


def _freeze_config(crypten: Any) -> None:
    """Replace CrypTen's OmegaConf-backed config by plain attributes, once configured.

    CrypTen reads its config on every gate and every communication call (verbosity,
    protocol, provider, precision, validation flags); through OmegaConf that was about a
    fifth of a party's CPU time. The values never change during a party's life, so they are
    frozen. `cfg.temp_override` (used only by CrypTen's own max/argmax, which the plan does
    not call) thaws them for its duration.
    """
    from contextlib import contextmanager

    from omegaconf import OmegaConf

    cfg = crypten.cfg
    live = cfg.config
    frozen = _FrozenNode(OmegaConf.to_container(live, resolve=True))
    cfg.config = frozen

    @contextmanager
    def temp_override(override_dict):
        cfg.config = live
        try:
            with type(cfg).temp_override(cfg, override_dict):
                yield
        finally:
            cfg.config = frozen

    object.__setattr__(cfg, "temp_override", temp_override)


def _set_precision(crypten: Any, bits: int) -> None:
    """Set the (frozen) config's encoder precision: tensors CrypTen makes internally use it."""
    object.__setattr__(crypten.cfg.config.encoder, "precision_bits", bits)


def party_main(rank: int, conn: Any, settings: dict[str, Any], parent_pid: int) -> None:
    """Run party `rank` (0, 1) or the dealer (2) until told to stop."""
    watch_parent(parent_pid)
    try:
        with _cprofiled(settings.get("cprofile_dir"), rank):
            if rank == DEALER_RANK:
                _dealer(settings)
            else:
                _party_loop(rank, conn, settings)
    except BaseException:  # noqa: BLE001 - reported to the orchestrator, then exit non-zero
        try:
            send(conn, ("error", traceback.format_exc()))
        except Exception:
            pass
        sys.exit(1)


@contextmanager
def _cprofiled(folder: str | None, rank: int):
    """With MPC_CPROFILE=DIR (diagnostics): the party's whole life under cProfile, written to
    DIR/party<rank>.prof when it ends (the dealer is party 2). MPC_CPROFILE_CLOCK=cpu times
    with the process's CPU clock (all its threads) instead of wall time, so waiting is free."""
    if not folder:
        yield
        return
    import cProfile

    cpu = os.environ.get("MPC_CPROFILE_CLOCK") == "cpu"
    profiler = cProfile.Profile(time.process_time) if cpu else cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        Path(folder).mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(str(Path(folder) / f"party{rank}.prof"))


def main(argv: list[str] | None = None) -> int:
    """Two forms:

    `python -m backends.mpc.crypten_party RANK FD`   a party started by backends.mpc (FD: its end of
        a socketpair with the orchestrator; the first message on it is the settings dict);
    `python -m backends.mpc.crypten_party model-owner|dealer --master-addr A --master-port P ...`
        a standalone model owner or dealer on another machine, for a data owner running
        the benchmark with `--backends mpc:local_parties=data_owner` (see backends/mpc/crypten_engine.py).
    """
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("model-owner", "dealer"):
        return _standalone(argv)
    from multiprocessing.connection import Connection

    rank, fd = int(argv[0]), int(argv[1])
    conn = Connection(fd)
    settings = recv(conn)
    party_main(rank, conn, settings, os.getppid())
    return 0


def _standalone(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m backends.mpc.crypten_party",
                                description="run the model owner (party 0) or the triple dealer "
                                            "(party 2) of a two-party CrypTen session")
    p.add_argument("role", choices=("model-owner", "dealer"))
    p.add_argument("--master-addr", required=True, help="this model owner's reachable address")
    p.add_argument("--master-port", type=int, required=True)
    p.add_argument("--checkpoint", help="model owner: a model checkpoint written by `suite train`")
    p.add_argument("--labels", help="model owner: comma-separated output labels, in the data owner's order")
    p.add_argument("--precision-bits", type=int, default=0,
                   help="fixed-point fractional bits; 0 (default): chosen from a calibration pass on "
                        "public synthetic images, as the benchmark does")
    p.add_argument("--triples", choices=("ttp", "tfp"), default="ttp")
    p.add_argument("--pre-mode", choices=("split", "mul"), default="split")
    p.add_argument("--relu", choices=("packed", "crypten"), default="packed")
    p.add_argument("--truncation", choices=("exact", "local"), default="exact")
    p.add_argument("--scaling", choices=("channels", "none"), default="channels",
                   help="per-channel power-of-two rescaling before sharing (more fractional bits fit)")
    p.add_argument("--reveal-to", choices=("data_owner", "both"), default="data_owner")
    p.add_argument("--rng", choices=("csprng", "torch"), default="csprng",
                   help="randomness: csprng (AES-256-CTR keyed from os.urandom, default) or torch "
                        "(CrypTen's stock MT19937: insecure, only to measure the CSPRNG's cost); "
                        "every party and the dealer must use the same")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout-s", type=float, default=900.0)
    a = p.parse_args(argv)
    settings = {"master_addr": a.master_addr, "master_port": a.master_port, "threads": a.threads,
                "triples": a.triples, "precision_bits": a.precision_bits, "reveal_to": a.reveal_to,
                "timeout_s": a.timeout_s, "relu": a.relu, "truncation": a.truncation,
                "record_dir": None, "profile": False, "rng": a.rng}
    if a.role == "dealer":
        _dealer(settings)
        return 0
    if not a.checkpoint or not a.labels:
        p.error("model-owner needs --checkpoint and --labels")
    from backends.mpc.plan import build_plan, gate_fixed_point, model_owner_fixed_point
    from suite.models import load_checkpoint

    bundle = load_checkpoint(Path(a.checkpoint)).restricted([x for x in a.labels.split(",") if x])
    plan, params = build_plan(bundle.net, a.pre_mode)
    plan, params, cal, settings["precision_bits"] = model_owner_fixed_point(
        plan, params, bundle.resolution, a.precision_bits, a.truncation, a.scaling,
        **gate_fixed_point(a.triples, a.relu))
    settings["comparison_bits"] = cal.comparison_bits
    print(f"[model owner] fixed point: {settings['precision_bits']} fractional bits "
          f"({cal.headroom_bits(settings['precision_bits']):.1f} bits of headroom on calibration)",
          file=sys.stderr, flush=True)
    _party_loop(0, None, settings, model=(plan, params))
    return 0


def _party_loop(rank: int, conn: Any, settings: dict[str, Any], model: tuple | None = None) -> None:
    """Party 0 or 1. `conn` is the local controller's pipe (None for a standalone model owner,
    whose folded model is then passed as `model` = (plan, params)).

    The data owner drives: for each batch it receives its images from its controller and
    announces the batch shape to the model owner over the MPC channel (None = stop), so the
    model owner needs no instructions beyond its own model.
    """
    import torch

    from backends.mpc.plan import plan_from_dict, plan_to_dict, run_plan
    from backends.mpc.protocol import PlainWeight

    crypten = _configure(settings, rank)
    traffic = Traffic()
    record_dir = Path(settings["record_dir"]) if settings.get("record_dir") else None
    if record_dir is not None:
        traffic.record, traffic.opened = [], []
    install_counters(traffic)
    init_before = traffic.snapshot()
    crypten.init()
    comm = crypten.communicator.get()
    role = ROLES[rank]
    dealer = None
    if settings["triples"] == "ttp":
        from backends.mpc.protocol import size_triples_without_products

        size_triples_without_products()
    if settings["triples"] == "ttp" and rank == 0:
        from backends.mpc.protocol import DealerClient

        dealer = DealerClient()       # talks to mpc_protocol.serve_dealer, tensor-only answers
    ops = None                    # made once the precision and comparison width are agreed
    def report(kind: str, payload: dict) -> None:
        if conn is not None:
            send(conn, (kind, payload))
        else:
            t = payload.get("traffic", {})
            print(f"[{role}] {kind}: sent {t.get('sent', 0)} B, received {t.get('received', 0)} B, "
                  f"rounds {t.get('rounds', 0)}", file=sys.stderr, flush=True)

    # setup: party 0 has the folded model; party 1 learns the architecture from party 0,
    # and both check that they run the same protocol settings
    if model is not None:
        plan, params = model
    else:
        kind, plan, params = recv(conn)
        assert kind == "setup"
    before = init_before          # setup traffic includes CrypTen's seed exchange
    agreed = {k: settings.get(k) for k in ("triples", "relu", "reveal_to", "truncation", "rng")}
    bits = int(settings["precision_bits"])
    offer = comm.broadcast_obj({"plan": plan_to_dict(plan), "settings": agreed, "precision_bits": bits,
                                "comparison_bits": int(settings.get("comparison_bits") or 64)}
                               if rank == 0 else None, 0)
    # the data owner adopts the model owner's precision unless it asked for a specific one
    # (CrypTen's broadcast_obj refuses None from the source: "" means agreement)
    mine = {**agreed, "precision_bits": bits or offer["precision_bits"]}
    theirs = {**offer["settings"], "precision_bits": offer["precision_bits"]}
    verdict = comm.broadcast_obj(("" if theirs == mine else f"model owner runs {theirs}, data owner {mine}")
                                 if rank == 1 else None, 1)
    if verdict:
        raise RuntimeError(f"the parties disagree on the protocol settings: {verdict}")
    plan = plan_from_dict(offer["plan"])
    bits = int(offer["precision_bits"])
    comparison_bits = int(offer["comparison_bits"])     # the model owner's choice (calibrated)
    ops = CrypTenOps(crypten, settings.get("relu", "packed"), dealer, settings.get("truncation", "exact"),
                     comparison_bits)
    gates = ops.gates
    faults = (settings.get("faults") or "").split(",")    # tests only: one variant per batch
    from backends.mpc.protocol import FAULTS

    unknown = sorted({f for f in faults if f and f not in FAULTS})
    if unknown or (any(faults) and (gates is None or record_dir is None)):
        raise ValueError(f"MPC_PROTOCOL_FAULTS is for the leak tests only (with MPC_RECORD_DIR and our "
                         f"gates); known variants {', '.join(FAULTS)}, got {','.join(faults)}")
    if record_dir is not None and gates is not None:
        gates.view = []
    if settings.get("profile"):
        ops = ProfiledOps(ops)

    _set_precision(crypten, bits)
    scale = 2.0 ** bits
    # with a dealer and exact truncation, the model owner keeps its product weights in clear
    # (one product per party, half the bytes); everything else is secret-shared
    plain_ops = plain_weight_ops(plan) if settings["triples"] == "ttp" and ops._gates is not None else {}
    shared = {}
    plain = []
    with crypten.no_grad():
        for name, shape in plan.shapes.items():
            if name in plain_ops:
                op = plain_ops[name]
                size = torch.Size(shape[::-1] if op == "matmul" else shape)
                value = None
                if rank == 0:
                    enc = torch.round(params[name].double() * scale).long()
                    value = enc.t().contiguous() if op == "matmul" else enc
                shared[name] = PlainWeight(len(plain), op, size, value)
                plain.append(shared[name])
                continue
            # party 0 rounds to the fixed-point grid (CrypTen's encoder truncates)
            value = torch.round(params[name] * scale) / scale if rank == 0 else torch.zeros(shape)
            shared[name] = crypten.cryptensor(value, src=0, precision=bits)
        if plain:
            gates.fault = "unmasked_weights" if "unmasked_weights" in faults else ""
            gates.share_plain_weights(plain)
            gates.fault = ""
    params = None
    report("ready", {"traffic": Traffic.delta(traffic.snapshot(), before), "peak_rss": peak_rss_bytes()})
    n_batch = 0
    while True:
        before = traffic.snapshot()
        images = None
        if rank == 1:
            msg = recv(conn)
            shape, images = (tuple(msg[1]), msg[2]) if msg[0] == "infer" else ("stop", None)
            comm.broadcast_obj(shape, 1)             # tell the model owner: next batch / stop
        else:
            shape = comm.broadcast_obj(None, 1)
        if shape == "stop":
            break
        if gates is not None:
            gates.fault = faults[n_batch] if n_batch < len(faults) else ""
        start, cpu_start = time.perf_counter(), time.process_time()
        if dealer is not None and plain and settings.get("relu", "packed") == "packed":
            # the whole batch's triples and pairs, announced ahead (the planner knows our gates only)
            from backends.mpc.dealer_plan import batch_requests

            dealer.plan_batch(batch_requests(plan, shared, shape, bits, ops.narrow), device="cpu")
        with crypten.no_grad():
            # the data owner's public, exact rescaling of its own pixels (see Plan.input_scale)
            x = crypten.cryptensor(images.double() * plan.input_scale if rank == 1 else torch.zeros(shape),
                                   src=1, precision=bits)
            logits = run_plan(plan, shared, x, ops)
            if settings["reveal_to"] == "both":
                out = logits.get_plain_text()
            else:
                out = logits.get_plain_text(dst=1)
        if dealer is not None:
            dealer.end_batch()
        local_s = time.perf_counter() - start
        cpu_s = time.process_time() - cpu_start
        if record_dir is not None:
            torch.save(traffic.record, record_dir / f"{role}_batch{n_batch}.pt")
            # the party's own view besides what it received: its share of the input
            torch.save({"input_share": x._tensor.share.clone(), "precision_bits": bits,
                        "input_scale": plan.input_scale,
                        "gate_inputs": list(gates.view) if gates is not None else [],
                        "opened": traffic.opened}, record_dir / f"{role}_batch{n_batch}_own.pt")
            traffic.opened = []
            if gates is not None:
                gates.view = []
            traffic.record = []
        n_batch += 1
        receives = rank == 1 or settings["reveal_to"] == "both"
        profile = dict(ops.seconds) if isinstance(ops, ProfiledOps) else None
        if profile is not None:
            ops.seconds.clear()
        report("result", {"logits": out if receives else None, "local_s": local_s, "cpu_s": cpu_s,
                          "profile": profile, "traffic": Traffic.delta(traffic.snapshot(), before),
                          "peak_rss": peak_rss_bytes()})
    crypten.uninit()


def _dealer(settings: dict[str, Any]) -> None:
    """The trusted third party: generates Beaver triples on party 0's requests."""
    _configure(settings, DEALER_RANK)
    from backends.mpc.protocol import serve_dealer

    serve_dealer()       # returns when party 0 sends "terminate" at its shutdown


if __name__ == "__main__":
    raise SystemExit(main())
