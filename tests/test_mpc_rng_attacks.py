"""The CSPRNG under CrypTen, tested by the attacks it must stop (each with its positive control).

(a) MT19937 state recovery: 312 observed ring elements (624 32-bit outputs) predict every
    later draw of CrypTen's stock generator, and nothing of the suite's AES-256-CTR stream.
(b) End to end, from the model owner's recorded view of a real two-process run with a
    dealer (its own input share plus everything it received): the first AND of our gates
    opens the data owner's dealer-seeded triple share on a zero input, so with rng=torch the
    model owner clones that stream, predicts the mask of the next batch's first Beaver
    opening and reads the image; with the CSPRNG the same attack finds nothing.
"""

from __future__ import annotations

import os
from importlib.util import find_spec

import numpy as np
import pytest
import torch

from tests.mpc_support import clone_mt19937, outputs_to_words, predict_after, words_to_outputs

pytestmark = pytest.mark.skipif(find_spec("crypten") is None, reason="needs the [mpc] extra")

ARCH = dict(growth_rate=4, block_config=(1, 1), num_init_features=8, bn_size=2)
LABELS = ["a", "b"]
SIZE = 32


def _stock_and_ours():
    from backends.mpc.crypten_compat import import_crypten
    from backends.mpc.csprng import KeystreamGenerator, new_key

    import_crypten()
    from crypten.common.rng import generate_random_ring_element

    stock = torch.Generator()
    stock.manual_seed(int.from_bytes(os.urandom(8), "little"))
    return generate_random_ring_element, stock, KeystreamGenerator(new_key())


def test_mt19937_state_recovery_predicts_cryptens_stock_generator():
    """Positive control: the attack works on what CrypTen ships (rng=torch)."""
    draw, stock, _ = _stock_and_ours()
    seen, later = draw((312,), generator=stock), draw((4096,), generator=stock)
    assert np.array_equal(predict_after(seen.numpy(), 4096), later.numpy())


def test_mt19937_state_recovery_fails_against_the_csprng():
    draw, _, ours = _stock_and_ours()
    seen, later = draw((312,), generator=ours), draw((4096,), generator=ours)
    assert int((predict_after(seen.numpy(), 4096) == later.numpy()).sum()) <= 1


def test_every_crypten_module_draws_through_the_csprng():
    """No CrypTen module kept a reference to the stock draw functions."""
    import sys

    from backends.mpc.crypten_compat import import_crypten

    import_crypten()
    users = [m for n, m in sys.modules.items() if n.startswith("crypten")
             and hasattr(m, "generate_random_ring_element")]
    assert len(users) >= 4
    for module in users:
        assert module.generate_random_ring_element.__module__ == "backends.mpc.csprng", module
    import crypten
    from crypten.mpc.provider import ttp_provider

    assert crypten._setup_prng.__module__ == "backends.mpc.csprng"
    assert ttp_provider.TTPServer._setup_generators.__module__ == "backends.mpc.csprng"


def test_csprng_kbit_values_are_in_range_and_streams_agree():
    from backends.mpc.csprng import KeystreamGenerator, new_key

    key = new_key()
    a, b = KeystreamGenerator(key), KeystreamGenerator(key)
    for bits in (1, 8, 13, 63):
        x, y = a.kbit((5000,), bits), b.kbit((5000,), bits)
        assert torch.equal(x, y)
        assert 0 <= int(x.min()) and 2 ** (bits - 1) <= int(x.max()) < 2 ** bits
    w = a.words((100_000,))
    assert w.min() < -(2 ** 62) and w.max() > 2 ** 62          # the whole ring
    with pytest.raises(ValueError, match="32-byte key"):
        KeystreamGenerator(os.urandom(8))


# ------------------------------------------------------------------ (b) end to end

def _bundle():
    from suite.models import ModelBundle, build_densenet

    torch.manual_seed(0)
    net = build_densenet(ARCH, len(LABELS)).eval()
    return ModelBundle(net=net, name="tiny-rng", architecture=ARCH, pathologies=LABELS,
                       resolution=SIZE, source="test")


def _images(n: int) -> np.ndarray:
    g = torch.Generator().manual_seed(3)
    base = torch.rand(n, 1, SIZE // 4, SIZE // 4, generator=g)
    img = torch.nn.functional.interpolate(base, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return (img * 2048 - 1024).numpy().astype(np.float32)


@pytest.fixture(scope="module", params=["torch", "csprng"])
def recorded_view(request, tmp_path_factory):
    """A real run (dealer, two batches of one image) with the model owner recording its view."""
    from backends.mpc import MPCBackend, MPCOptions
    from suite.backend import BackendContext
    from suite.meter import CommMeter

    tmp = tmp_path_factory.mktemp(f"rng-{request.param}")
    os.environ["MPC_RECORD_DIR"] = str(tmp)
    images = _images(2)
    backend = MPCBackend(MPCOptions(triples="ttp", batch_size=1, rng=request.param, timeout_s=300))
    ctx = BackendContext(model=_bundle(), meter=CommMeter(), workdir=tmp, threads=2)
    try:
        backend.setup(ctx)
        for i in range(2):
            backend.predict_proba(images[i:i + 1])
    finally:
        backend.teardown()
        del os.environ["MPC_RECORD_DIR"]
    return {"rng": request.param, "dir": tmp, "images": images, "backend": backend}


def _int64_tensors(record):
    for _, payload in record:
        for t in payload if isinstance(payload, list) else [payload]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.int64 and t.numel():
                yield t.flatten().numpy()


def _clone_other_party_stream(record):
    """Find a received tensor that is 624+ consecutive MT19937 outputs; return the clone,
    positioned right after it (None when no received tensor is one)."""
    for words in _int64_tensors(record):
        if len(words) < 312 + 64:
            continue
        bg = clone_mt19937(words_to_outputs(words[:312]))
        rest = outputs_to_words(bg.random_raw(2 * (len(words) - 312)))
        if np.array_equal(rest, words[312:]):
            return bg
    return None


def model_owner_attack(record_dir, n_words: int = 1 << 22):
    """What a curious model owner does with its view; the recovered image or None."""
    bg = _clone_other_party_stream(torch.load(record_dir / "model_owner_batch0.pt", weights_only=False))
    if bg is None:
        return None
    own = torch.load(record_dir / "model_owner_batch1_own.pt", weights_only=False)
    x0 = own["input_share"].flatten().numpy().view(np.uint64)
    n, limit = len(x0), np.uint64(1 << (own["precision_bits"] + 24))
    stream = bg.random_raw(2 * n_words + 1)
    for parity in (0, 1):                      # 1-bit draws take one output: either alignment
        pred = outputs_to_words(stream[parity:parity + 2 * n_words]).view(np.uint64)
        for r in _int64_tensors(torch.load(record_dir / "model_owner_batch1.pt", weights_only=False)):
            if len(r) != n:
                continue
            r = r.view(np.uint64)
            first = x0[0] + r[0] + pred[:len(pred) - n]          # x = x0 + (x1 - a1) + a1
            small = np.nonzero((first + limit) < 2 * limit)[0]
            for k in small:
                x = (x0 + r + pred[k:k + n]).view(np.int64)
                if np.all(np.abs(x) < int(limit)):
                    return x / 2.0 ** own["precision_bits"] / own["input_scale"]
    return None


def test_model_owner_recovers_the_image_only_with_torchs_generator(recorded_view):
    recovered = model_owner_attack(recorded_view["dir"])
    image = recorded_view["images"][1].reshape(-1).astype(np.float64)
    if recorded_view["rng"] == "torch":        # positive control: the attack works
        assert recovered is not None, "the MT19937 attack failed against rng=torch"
        assert np.abs(recovered - image).max() < 1e-3
    else:
        assert recovered is None


def test_the_rows_say_which_randomness_they_had(recorded_view):
    tm = recorded_view["backend"].threat_model()
    if recorded_view["rng"] == "torch":
        assert "INSECURE RANDOMNESS" in tm.guarantee and tm.guarantee_kind == "none"
    else:
        assert "AES-256-CTR" in tm.guarantee and tm.guarantee_kind == "cryptographic"


@pytest.mark.parametrize("host", ["model_owner", "data_owner"])
def test_a_co_located_dealer_is_labelled_as_trust(host):
    from backends.mpc import MPCBackend, MPCOptions

    tm = MPCBackend(MPCOptions(triples="ttp", dealer_host=host)).threat_model()
    assert f"CO-LOCATED WITH THE {host.replace('_', ' ').upper()}" in " ".join(tm.trust_assumptions)
    victim = "images protected from the model owner by trust" if host == "model_owner" else \
        "weights protected from the data owner by trust"
    assert victim in tm.guarantee
    third = MPCBackend(MPCOptions(triples="ttp")).threat_model()
    assert "by trust" not in third.guarantee and "on its own host" in " ".join(third.trust_assumptions)
    assert any("fractional bits" in leak and "headroom" in leak for leak in third.leaks)


def test_every_row_says_which_channel_it_had():
    from backends.mpc import MPCBackend, MPCOptions

    local = " ".join(MPCBackend(MPCOptions()).threat_model().trust_assumptions)
    remote = " ".join(MPCBackend(MPCOptions(local_parties="data_owner")).threat_model().trust_assumptions)
    assert "channels: loopback" in local
    assert "channels: PLAIN TCP between hosts" in remote
    tunnelled = MPCBackend(MPCOptions(local_parties="data_owner", channel="tls-vpn")).threat_model()
    assert "channels: ENCRYPTED between hosts" in " ".join(tunnelled.trust_assumptions)
