"""Leak tests with teeth: deliberately broken protocol variants through the real two-process path.

One recorded session (tiny DenseNet, dealer triples, the run's automatic precision) runs the
same image in every batch; MPC_PROTOCOL_FAULTS picks the protocol variant per batch:

    batches 0, 1   the real protocol
    batches 2, 3   open_bits:  truncation opens its input unmasked (no truncation pair)
    batches 4, 5   reuse_mask: ReLU masks x and r_A with the same triple value
    batch  6       own_share:  the data owner sends its own share in the ReLU's opening
    batch  7       unmasked_input: the data owner sends its share of a product's input
                   unmasked (x1 - 0 instead of x1 - a) to the model owner, who holds W
    batches 8, 9   unmasked_compare: the ReLU's narrow comparison opens y + 2^32 (no mask r)

A second, one-batch session (unmasked_weights) has the model owner send its plain weights
unmasked (W - 0 instead of W - b) at setup; the data owner's view must show them.

From the model owner's view (what it received, what was opened, its own gate input shares)
the detector looks for two things:
  * secret-determined openings: with the secret fixed and the randomness varied (two batches),
    every opened value, and the difference and XOR of any two opened in one message, must
    agree across the batches no more than chance (per bit, against the bits' own marginals).
    Bit openings count (no magnitude cut-off);
  * a received value that, added to the model owner's own share of a gate input, is a
    plaintext fixed-point number (|v| < 2^60 for 90% of it; uniform shares: 1/8).
The real protocol must pass both; each broken variant must be caught.
"""

from __future__ import annotations

import os
from importlib.util import find_spec

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(find_spec("crypten") is None, reason="needs the [mpc] extra")

ARCH = dict(growth_rate=4, block_config=(1, 1), num_init_features=8, bn_size=2)
LABELS = ["a", "b"]
SIZE = 32
PLAN = ["", "", "open_bits", "open_bits", "reuse_mask", "reuse_mask", "own_share", "unmasked_input",
        "unmasked_compare", "unmasked_compare"]


def _bundle():
    from suite.models import ModelBundle, build_densenet

    torch.manual_seed(0)
    net = build_densenet(ARCH, len(LABELS)).eval()
    return ModelBundle(net=net, name="tiny-leaks", architecture=ARCH, pathologies=LABELS,
                       resolution=SIZE, source="test")


def _image():
    g = torch.Generator().manual_seed(5)
    return (torch.nn.functional.interpolate(torch.rand(1, 1, 8, 8, generator=g), size=(SIZE, SIZE),
                                            mode="bilinear") * 2048 - 1024).numpy()


def _recorded_session(tmp, plan: list[str]) -> dict:
    """One recording session, batch i running protocol variant plan[i] on the same image; the
    backend's precision rows."""
    from backends.mpc import MPCBackend, MPCOptions
    from suite.backend import BackendContext
    from suite.meter import CommMeter

    os.environ.update(MPC_RECORD_DIR=str(tmp), MPC_PROTOCOL_FAULTS=",".join(plan))
    backend = MPCBackend(MPCOptions(triples="ttp", batch_size=1, timeout_s=240))
    ctx = BackendContext(model=_bundle(), meter=CommMeter(), workdir=tmp, threads=2)
    try:
        backend.setup(ctx)
        for _ in plan:
            backend.predict_proba(_image())
    finally:
        backend.teardown()
        del os.environ["MPC_RECORD_DIR"], os.environ["MPC_PROTOCOL_FAULTS"]
    return {r["metric"]: r["value"] for r in backend.extra_rows() if not r.get("party")}


@pytest.fixture(scope="module")
def view(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mpc-leaks")
    rows = _recorded_session(tmp, PLAN)
    load = lambda name: torch.load(tmp / name, weights_only=False)  # noqa: E731
    return [{"received": load(f"model_owner_batch{i}.pt"), **load(f"model_owner_batch{i}_own.pt"),
             "rows": rows} for i in range(len(PLAN))]


# ------------------------------------------------------------------ the detector

def _bits(t: torch.Tensor) -> np.ndarray:
    return np.unpackbits(t.flatten().numpy().view(np.uint8)).reshape(-1, 64)


def _opened_tensors(opened) -> list[torch.Tensor]:
    """Each opened int64 tensor of at least 16 words (1024 bits: packed ReLU bits come 32 per
    word), plus the difference and XOR of each equal-sized pair in one message."""
    out = []
    for message in opened:
        items = [t for t in (message if isinstance(message, list) else [message])
                 if isinstance(t, torch.Tensor) and t.dtype == torch.int64 and t.numel() >= 16]
        out += items
        for i in range(len(items)):
            for j in range(i + 1, len(items)):
                if items[i].shape == items[j].shape:
                    out += [items[i] - items[j], items[i] ^ items[j]]
    return out


def excess_agreement(run_a: dict, run_b: dict) -> float:
    """Largest excess of per-bit agreement between two runs with the same secret over what
    independent draws from the bits' marginals give, in standard deviations."""
    worst = 0.0
    for a, b in zip(_opened_tensors(run_a["opened"]), _opened_tensors(run_b["opened"])):
        if a.shape != b.shape:
            raise AssertionError("the two runs opened different structures")
        ba, bb = _bits(a), _bits(b)
        p = (ba.mean(0) + bb.mean(0)) / 2
        expected = p ** 2 + (1 - p) ** 2                       # per bit column
        agree = (ba == bb).mean()
        e = expected.mean()
        sigma = np.sqrt(max(e * (1 - e), 1e-12) / ba.size)
        if agree - e > 0.02:
            worst = max(worst, (agree - e) / sigma)
    return worst


def own_share_hits(run: dict) -> int:
    """Received tensors that, with one of the model owner's own gate-input shares, sum to a
    plaintext fixed-point value."""
    hits = 0
    received = [t for _, p in run["received"] for t in (p if isinstance(p, list) else [p])
                if isinstance(t, torch.Tensor) and t.dtype == torch.int64 and t.numel() >= 64]
    for own in run["gate_inputs"]:
        for r in received:
            if r.numel() == own.numel():
                v = (own + r.flatten()).abs()
                if float((v < 2 ** 60).double().mean()) > 0.9:
                    hits += 1
    return hits


def _packed_bit_opening(t: torch.Tensor) -> bool:
    """An opened word of ReLU bits, 32 per word in 2-bit fields (b0 + b1 <= 2: no field is 3);
    a uniformly random word has a field equal to 3 with probability 1 - (3/4)^32."""
    fields = torch.stack([(t >> k) & 3 for k in range(0, 64, 2)])
    return bool((fields != 3).all()) and bool((fields != 0).any())


# ------------------------------------------------------------------ the tests

def test_the_real_protocol_passes_the_detector(view):
    assert len(_opened_tensors(view[0]["opened"])) > 20          # the gates really opened values
    assert any(_packed_bit_opening(t) for t in _opened_tensors(view[0]["opened"]))   # bit openings count
    assert excess_agreement(view[0], view[1]) < 8
    assert own_share_hits(view[0]) == 0 and own_share_hits(view[1]) == 0


def test_opening_the_wrap_bit_and_msb_unmasked_is_caught(view):
    assert excess_agreement(view[2], view[3]) > 8


def test_reusing_a_mask_is_caught(view):
    assert excess_agreement(view[4], view[5]) > 8


def test_sending_a_partys_own_share_is_caught(view):
    assert own_share_hits(view[6]) > 0


def test_a_product_input_sent_unmasked_is_caught(view):
    assert own_share_hits(view[7]) > 0


def test_the_narrow_comparison_ran_and_its_input_sent_unmasked_is_caught(view):
    assert view[0]["rows"]["relu_comparison_bits"] == 32            # the real run used it
    assert view[0]["rows"]["relu_comparison_headroom_bits"] >= 8
    assert excess_agreement(view[8], view[9]) > 8


def _plain_weight_encodings(bits: int) -> list[torch.Tensor]:
    from backends.mpc.crypten_party import plain_weight_ops
    from backends.mpc.plan import build_plan, model_owner_fixed_point

    plan, params = build_plan(_bundle().net)
    plan, shared, _, _ = model_owner_fixed_point(plan, params, SIZE, 0, "exact")
    return [torch.round(shared[name].double() * 2.0 ** bits).long() for name in plain_weight_ops(plan)]


def weight_hits(record, encodings: list[torch.Tensor]) -> int:
    """Elements of received tensors equal to the model owner's plain weight encodings (|W| > 2^8)."""
    enc = torch.cat([e.flatten() for e in encodings])
    enc = enc[enc.abs() > 2 ** 8]
    received = [t.flatten() for _, p in record for t in (p if isinstance(p, list) else [p])
                if isinstance(t, torch.Tensor) and t.dtype == torch.int64 and t.numel() >= 64]
    return sum(int(torch.isin(t, enc).sum()) for t in received)


@pytest.mark.parametrize("fault", ["", "unmasked_weights"])
def test_plain_weights_reach_the_data_owner_only_masked(fault, tmp_path):
    """The model owner's plain weights travel once, as W - b (b the dealer's uniform mask): the
    data owner's view holds none of their encodings; sending W - 0 instead is caught."""
    _recorded_session(tmp_path, [fault])
    record = torch.load(tmp_path / "data_owner_batch0.pt", weights_only=False)
    bits = int(torch.load(tmp_path / "model_owner_batch0_own.pt", weights_only=False)["precision_bits"])
    hits = weight_hits(record, _plain_weight_encodings(bits))
    assert (hits > 100) if fault else (hits == 0), hits


def test_faults_are_refused_outside_the_leak_tests(tmp_path):
    from backends.mpc.crypten_party import _party_loop  # noqa: F401  (the check lives there)

    src = (find_spec("backends.mpc.crypten_party").origin)
    text = open(src).read()
    assert "MPC_PROTOCOL_FAULTS is for the leak tests only" in text
