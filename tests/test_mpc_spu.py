"""The SPU engine of the `mpc` backend (`mpc:engine=spu`), with real parties in `.venv-spu/`.

Tiny DenseNets (growth 4, blocks (1, 1), 32 px) keep this to a few party start-ups:
  * the JAX translation of the plan (backends.mpc.spu_jax) matches torch in plaintext;
  * SEMI2K and Cheetah evaluations match torch (max |dp| <= 1e-3);
  * a recording TCP proxy sits in front of each party's brpc port, so *everything* that
    crosses the wire is captured: what the model owner receives holds nothing equal to, or
    correlated with, the image; what the data owner receives nothing of the weights;
  * killing either party mid-run ends the backend with a clear error, in bounded time;
  * without `.venv-spu/` the engine is unavailable with a one-line message saying how to
    create it.
Tests that need `.venv-spu/` skip only when it is absent (scripts/test.sh creates it).
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from backends.mpc.parties import free_port as _free_port
from backends.mpc.spu_engine import spu_available, spu_python
from tests.mpc_support import kill_party_mid_run

needs_spu = pytest.mark.skipif(not spu_available(), reason="needs .venv-spu/ (bash scripts/setup.sh)")

ARCH = dict(growth_rate=4, block_config=(1, 1), num_init_features=8, bn_size=2)
LABELS = ["a", "b", "c"]
SIZE = 32
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle():
    from suite.models import ModelBundle, build_densenet

    torch.manual_seed(0)
    net = build_densenet(ARCH, len(LABELS))
    for m in net.modules():                 # calibrated BN with random (also negative) scales
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = torch.randn_like(m.weight)
            m.bias.data = torch.randn_like(m.bias) * 0.5
            m.momentum = None
    net.train()
    with torch.no_grad():
        net.features2(torch.rand(16, 1, SIZE, SIZE) * 2048 - 1024)
    return ModelBundle(net=net.eval(), name="tiny-spu", architecture=ARCH, pathologies=LABELS,
                       resolution=SIZE, source="test")


def _images(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 1, SIZE // 4, SIZE // 4, generator=g)   # smooth, image-like content
    img = torch.nn.functional.interpolate(base, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return (img * 2048 - 1024).numpy().astype(np.float32)


def _reference(bundle, images):
    with torch.no_grad():
        return torch.sigmoid(bundle.logits(torch.from_numpy(images)).double()).numpy()


def _backend(tmp_path, bundle, **options):
    from backends.mpc import MPCBackend
    from suite.backend import BackendContext
    from suite.meter import CommMeter

    raw = {"engine": "spu", "timeout_s": 120, **options}
    backend = MPCBackend.create(MPCBackend.Options.parse(raw, "mpc"))
    ctx = BackendContext(model=bundle, meter=CommMeter(), workdir=tmp_path, threads=2)
    return backend, ctx


# ------------------------------------------------------------------ options, availability

def test_engine_and_protocol_pick_the_implementation_and_label():
    from backends.mpc import MPCBackend, MPCOptions
    from suite.errors import SuiteError

    from backends.mpc.crypten_engine import CrypTenBackend
    assert MPCBackend.implementation(MPCOptions()) is CrypTenBackend
    with pytest.raises(SuiteError, match="engine=spu only"):
        MPCBackend.create(MPCOptions(protocol="cheetah"))
    with pytest.raises(SuiteError, match="engine must be"):
        MPCBackend.create(MPCOptions(engine="mp-spdz"))
    if spu_available():
        from backends.mpc.spu_engine import SPUBackend

        semi = MPCBackend.create(MPCOptions(engine="spu"))
        assert type(semi) is SPUBackend
        assert semi.config_label() == "mpc[engine=spu,protocol=semi2k]"
        assert MPCBackend.create(MPCOptions(engine="spu", protocol="semi2k")).config_label() == semi.config_label()
        cheetah = MPCBackend.create(MPCOptions(engine="spu", protocol="cheetah", field="FM128"))
        assert cheetah.config_label() == "mpc[engine=spu,field=FM128,protocol=cheetah]"
        assert "TRUSTED FIRST PARTY" in semi.threat_model().trust_assumptions[0]
        assert "no dealer" in cheetah.threat_model().trust_assumptions[0]
        with pytest.raises(SuiteError, match="engine=crypten only"):
            MPCBackend.create(MPCOptions(engine="spu", triples="tfp"))
        with pytest.raises(SuiteError, match="protocol must be"):
            MPCBackend.create(MPCOptions(engine="spu", protocol="aby3"))


@needs_spu
def test_model_owner_on_another_host_needs_both_link_addresses_and_labels_the_channel(monkeypatch):
    """local_parties=data_owner: the model owner's party runs elsewhere
    (`python -m backends.mpc.spu_engine model-owner`); our data owner must be told both link
    addresses, and every row says which channel carried the brpc link."""
    from backends.mpc import MPCBackend, MPCOptions
    from suite.errors import SuiteError

    monkeypatch.delenv("MPC_MASTER_PORT", raising=False)
    with pytest.raises(SuiteError, match="needs data_owner_addr, data_owner_port, master_port") as err:
        MPCBackend.create(MPCOptions(engine="spu", local_parties="data_owner"))
    assert "\n" not in str(err.value)
    with pytest.raises(SuiteError, match="local_parties must be"):
        MPCBackend.create(MPCOptions(engine="spu", local_parties="model_owner"))
    with pytest.raises(SuiteError, match="tls-vpn is for parties on other hosts"):
        MPCBackend.create(MPCOptions(engine="spu", channel="tls-vpn"))
    remote = dict(engine="spu", local_parties="data_owner", master_port=29517,
                  data_owner_addr="10.78.0.1", data_owner_port=29518)
    texts = {}
    for channel in ("plain", "tls-vpn"):
        backend = MPCBackend.create(MPCOptions(channel=channel, **remote))
        tm = backend.threat_model()
        texts[channel] = tm.trust_assumptions[-1]
        assert "each party runs on its own host" in " ".join(tm.trust_assumptions)
        assert "brpc" in texts[channel] and "dealer" not in texts[channel]
    assert "ENCRYPTED" in texts["tls-vpn"] and "PLAIN TCP" in texts["plain"]
    local = MPCBackend.create(MPCOptions(engine="spu")).threat_model().trust_assumptions[-1]
    assert "loopback" in local


def test_missing_spu_environment_is_a_one_line_error(tmp_path, monkeypatch):
    from backends.mpc import MPCBackend, MPCOptions
    from suite.errors import BackendUnavailable

    monkeypatch.setenv("SPU_VENV", str(tmp_path / "no-venv"))
    with pytest.raises(BackendUnavailable) as err:
        MPCBackend.create(MPCOptions(engine="spu", protocol="cheetah"))
    msg = str(err.value)
    assert "\n" not in msg and "bash scripts/setup.sh" in msg and "no-venv" in msg


# ------------------------------------------------------------------ the translation

@needs_spu
@pytest.mark.parametrize("pre_mode", ["split", "mul"])
def test_jax_plan_matches_torch_in_plaintext(bundle, tmp_path, pre_mode):
    """The JAX function SPU compiles is the suite's plan, traced: run it in plaintext in
    .venv-spu and compare with torch (the model itself and the folded plan)."""
    from backends.mpc.graph import plan_to_dict
    from backends.mpc.plan import build_plan
    from backends.mpc.codec import pack, unpack

    plan, params = build_plan(bundle.net, pre_mode)
    images = _images(3)
    job = {"plan": plan_to_dict(plan), "params": {k: pack(v.numpy()) for k, v in params.items()},
           "images": pack(images)}
    (tmp_path / "in.pkl").write_bytes(pickle.dumps(job, protocol=4))
    subprocess.run([str(spu_python()), "-m", "backends.mpc.spu_jax", str(tmp_path / "in.pkl"),
                    str(tmp_path / "out.pkl")], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                   check=True, timeout=300)
    jax_logits = unpack(pickle.loads((tmp_path / "out.pkl").read_bytes())["logits"])
    with torch.no_grad():
        torch_logits = bundle.logits(torch.from_numpy(images)).double().numpy()
    scale = np.abs(torch_logits).max() + 1
    assert jax_logits.shape == torch_logits.shape
    assert np.abs(jax_logits - torch_logits).max() <= 1e-4 * scale     # float32 vs float64


# ------------------------------------------------------------------ leak detector on raw bytes

class RecordingProxy:
    """A TCP forwarder in front of one party's link port that keeps every byte, per
    connection and direction (up = towards the listening party)."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.streams: list[tuple[str, bytearray]] = []
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            up, down = bytearray(), bytearray()
            with self._lock:
                self.streams += [("up", up), ("down", down)]
                self._socks += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, up), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, down), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, buf: bytearray) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                buf += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def received_by_target(self) -> list[bytes]:
        return [bytes(b) for d, b in self.streams if d == "up"]

    def received_by_peer(self) -> list[bytes]:
        return [bytes(b) for d, b in self.streams if d == "down"]

    def close(self) -> None:
        self.server.close()
        for s in self._socks:
            s.close()


def _words(buf: bytes) -> list[np.ndarray]:
    """`buf` read as little-endian 64-bit integers, at every byte alignment."""
    out = []
    for off in range(8):
        n = (len(buf) - off) // 8
        if n > 0:
            out.append(np.frombuffer(buf, dtype=np.int64, count=n, offset=off))
    return out


def _log_magnitude(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.float64)
    return np.sign(v) * np.log2(1 + np.abs(v))


def _max_corr_z(stream: np.ndarray, template: np.ndarray) -> float:
    """max over offsets of |Pearson r| * sqrt(n) between `template` and every window of
    `stream` of its length (normalised cross-correlation via FFT)."""
    n = len(template)
    if len(stream) < n or n < 100:
        return 0.0
    t = template - template.mean()
    if t.std() == 0:
        return 0.0
    size = 1 << int(np.ceil(np.log2(len(stream) + n)))
    num = np.fft.irfft(np.fft.rfft(stream, size) * np.conj(np.fft.rfft(t, size)), size)[: len(stream) - n + 1]
    c1 = np.concatenate([[0.0], np.cumsum(stream)])
    c2 = np.concatenate([[0.0], np.cumsum(stream * stream)])
    s1, s2 = c1[n:] - c1[:-n], c2[n:] - c2[:-n]
    var = np.maximum(s2 - s1 * s1 / n, 1e-9)
    r = num / np.sqrt(var * (t * t).sum())
    r[var <= 1e-6 * n] = 0.0                      # constant windows (padding, headers)
    return float(np.abs(r).max() * np.sqrt(n))


def wire_leak_report(streams: list[bytes], secrets: list[np.ndarray], fxp_bits: int,
                     corr: bool = True) -> dict:
    """How much of what crossed the wire (raw TCP bytes) looks like the `secrets`.

    * equal:    pairs of neighbouring 8-byte words (any alignment) that both equal a
                fixed-point encoding of a secret value (|encoding| > 2^12), a secret as float64,
                or two neighbouring secret values as float32: a plaintext copy of a secret
                matches along its whole length; a single chance match of a small integer in
                Cheetah's (non-uniform) HE and OT traffic does not count
    * small:    fraction of 8-byte words, at the best alignment, with 2 < |v| < 2^40; shares
                over Z_2^64 are uniform (~2^-23); plaintext fixed-point data is all small
    * corr_z:   largest |r| * sqrt(n) between sign(v) log2|v| of the wire words and of a
                secret's encoding, over every offset and alignment (independent data: about
                5-7 at these stream lengths; a copy, even lightly masked: ~sqrt(n) >= 10)
    """
    enc = [np.round(np.asarray(s, np.float64).ravel() * 2.0 ** fxp_bits).astype(np.int64) for s in secrets]
    enc_all = np.concatenate(enc)
    enc_set = np.unique(enc_all[np.abs(enc_all) > 2 ** 12])
    pairs = []                       # two neighbouring secret values as float32, or one as float64
    for s in secrets:
        a = np.asarray(s, np.float32).ravel()
        keep = (np.abs(a[:-1]) > 1e-3) | (np.abs(a[1:]) > 1e-3)
        lo, hi = a[:-1].view(np.uint32).astype(np.uint64), a[1:].view(np.uint32).astype(np.uint64)
        pairs.append((lo | (hi << np.uint64(32)))[keep].view(np.int64))
        d = np.asarray(s, np.float64).ravel()
        pairs.append(d[np.abs(d) > 1e-3].view(np.int64))
    enc_set = np.union1d(enc_set, np.concatenate(pairs))
    equal, small, corr_z, total, examples = 0, 0.0, 0.0, 0, []
    for buf in streams:
        if len(buf) < 64:
            continue
        total += len(buf) // 8
        words = _words(buf)
        for w in words:
            hit = np.isin(w, enc_set)
            run = hit[:-1] & hit[1:]               # two neighbouring words: a copied tensor
            equal += int(run.sum())
            examples += [int(v) for v in w[:-1][run][:3]]
        mag = [np.abs(w) for w in words]
        small = max([small] + [float(((m > 2) & (m < 2 ** 40)).mean()) for m in mag if len(m) > 1000])
        if corr:
            for w in words:
                lw = _log_magnitude(w)
                for e in enc:
                    corr_z = max(corr_z, _max_corr_z(lw, _log_magnitude(e)))
    return {"equal": equal, "small": small, "corr_z": corr_z, "words": total, "examples": examples[:6]}


def test_wire_leak_detector_catches_a_plaintext_leak():
    """Positive control: a plaintext (or lightly masked) image inside framing is flagged."""
    rng = np.random.default_rng(0)
    img = _images(2) * 2.0 ** -10
    enc = np.round(img.ravel() * 2.0 ** 18).astype(np.int64)
    noise = rng.integers(-2 ** 62, 2 ** 62, 5000, dtype=np.int64)
    framed = b"PRPC\x00\x01\x02" + noise.tobytes() + b"xyz" + enc.tobytes() + noise.tobytes()
    report = wire_leak_report([framed], [img], 18)
    assert report["equal"] > 1000 and report["corr_z"] > 20, report
    masked = enc + rng.integers(-2 ** 12, 2 ** 12, enc.shape, dtype=np.int64)   # 1/64 of the range
    report = wire_leak_report([b"ab" + noise.tobytes() + masked.tobytes()], [img], 18)
    assert report["corr_z"] > 20, report
    clean = wire_leak_report([b"\x01" + rng.integers(-2 ** 63, 2 ** 63 - 1, 20000, dtype=np.int64).tobytes()],
                             [img], 18)
    assert clean["equal"] == 0 and clean["corr_z"] < 8 and clean["small"] < 1e-3, clean


@pytest.fixture(scope="module", params=["semi2k", "cheetah"])
def recorded_run(request, bundle, tmp_path_factory):
    """One run per protocol with a recording proxy in front of each party's link port."""
    if not spu_available():
        pytest.skip("needs .venv-spu/ (bash scripts/setup.sh)")
    protocol = request.param
    tmp = tmp_path_factory.mktemp(f"spu-{protocol}")
    ports = [_free_port("127.0.0.1"), _free_port("127.0.0.1")]
    proxies = [RecordingProxy(p) for p in ports]
    os.environ["MPC_SPU_CONNECT_VIA"] = ",".join(f"127.0.0.1:{p.port}" for p in proxies)
    n = 2 if protocol == "semi2k" else 1
    images = _images(n)
    try:
        backend, ctx = _backend(tmp, bundle, protocol=protocol, batch_size=n,
                                master_port=ports[0], data_owner_port=ports[1])
        try:
            backend.setup(ctx)
            ctx.meter.set_phase("online")
            probs = backend.predict_proba(images)
        finally:
            backend.teardown()
    finally:
        del os.environ["MPC_SPU_CONNECT_VIA"]
        time.sleep(0.2)
        for p in proxies:
            p.close()
    # party 0 receives what arrives at its port, plus party 1's server's answers to it
    received = {"model_owner": proxies[0].received_by_target() + proxies[1].received_by_peer(),
                "data_owner": proxies[1].received_by_target() + proxies[0].received_by_peer()}
    return {"protocol": protocol, "images": images, "probs": probs, "meter": ctx.meter,
            "backend": backend, "received": received}


def test_secure_outputs_match_torch_and_traffic_is_metered(recorded_run, bundle):
    probs, images = recorded_run["probs"], recorded_run["images"]
    assert np.abs(probs - _reference(bundle, images)).max() <= 1e-3
    snap = recorded_run["meter"].snapshot()
    online = {party: t for (phase, party), t in snap.items() if phase == "online"}
    assert set(online) == {"model_owner", "data_owner"}
    for t in online.values():
        assert t.bytes_sent > 0 and t.messages > 0 and t.rounds == 0   # SPU counts no rounds
    # link statistics are payload bytes: the wire carries them plus brpc framing
    wire = {k: sum(len(b) for b in v) for k, v in recorded_run["received"].items()}
    total = sum(t.bytes_received for (_, party), t in snap.items() if party == "data_owner")
    assert total <= wire["data_owner"] <= 2 * total + 1_000_000, (total, wire)
    rows = {(r["metric"], r.get("network")): r for r in recorded_run["backend"].extra_rows()}
    lan, wan = rows[("projected_latency_per_image", "lan")], rows[("projected_latency_per_image", "wan")]
    assert wan["value"] > lan["value"]
    assert lan["estimate"] == wan["estimate"] == "projected"
    assert "messages" in wan["note"]


def test_model_owner_never_receives_the_image(recorded_run):
    img = recorded_run["images"] * 2.0 ** -10             # what the data owner shares
    semi = recorded_run["protocol"] == "semi2k"
    report = wire_leak_report(recorded_run["received"]["model_owner"], [img, recorded_run["images"]], 18,
                              corr=True)
    assert report["words"] > 10_000, report
    assert report["equal"] == 0, repr(report)
    assert report["corr_z"] < 8, report
    if semi:                   # Cheetah's HE ciphertexts live mod q < 2^64: not uniform words
        assert report["small"] < 1e-3, report


def test_data_owner_never_receives_the_weights(recorded_run, bundle):
    from backends.mpc.plan import build_plan

    _, params = build_plan(bundle.net)
    weights = [v.numpy() for v in params.values()]
    semi = recorded_run["protocol"] == "semi2k"
    # the correlation scan is FFT-heavy: on Cheetah's larger stream, the largest weights only
    big = sorted(weights, key=lambda w: -w.size)[: (None if semi else 2)]
    report = wire_leak_report(recorded_run["received"]["data_owner"], weights, 18, corr=False)
    report["corr_z"] = wire_leak_report(recorded_run["received"]["data_owner"], big, 18)["corr_z"]
    assert report["words"] > 10_000, report
    assert report["equal"] == 0, repr(report)
    assert report["corr_z"] < 8, report
    if semi:
        assert report["small"] < 1e-3, report


# ------------------------------------------------------------------ robustness

@needs_spu
@pytest.mark.parametrize("victim", [1])
def test_killing_a_party_mid_run_fails_fast_and_cleanly(victim, bundle, tmp_path):
    """SPU parties die like CrypTen's: one victim here (the data owner); the orchestrator's
    handling of each victim (model owner, data owner, dealer) is PartyBackend's, shared with
    CrypTen and covered for all three in tests/test_mpc.py (saves one SPU start, ~15 s)."""
    from backends.mpc import MPCPartyError

    backend, ctx = _backend(tmp_path, bundle, batch_size=2, timeout_s=60)
    exc, seconds = kill_party_mid_run(backend, ctx, _images(2), victim)
    assert isinstance(exc, MPCPartyError), repr(exc)
    who = {0: "model owner", 1: "data owner"}[victim]
    assert f"{who} (party {victim}) exited (killed by signal 9)" in str(exc), str(exc)
    assert seconds < 30
