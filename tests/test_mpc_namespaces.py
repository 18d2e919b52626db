"""Two-party inference across network namespaces (scripts/mpc_two_namespaces.sh): CrypTen with
its dealer on a host of its own, and SecretFlow SPU (SEMI2K) with its model owner on the
vendor's host, each with a capture of the link between the hosts.

Three party namespaces (hospital, vendor, dealer) joined only by a bridge in a fourth (the
untrusted link). The vendor runs the standalone model owner (`python -m
backends.mpc.crypten_party model-owner` / `python -m backends.mpc.spu_engine model-owner`), the
dealer namespace CrypTen's dealer, the hospital `suite run --backends
plaintext,mpc:local_parties=data_owner:channel=C,mpc:engine=spu:local_parties=data_owner:...`.
ONE namespace setup (one set of tunnels) and one trained checkpoint; in it one session per
channel, each a single benchmark run with both engines' rows (2 images at 32 px each):

* channel=tls-vpn (the suite's OpenVPN tunnels between every pair of hosts): the row matches
  plaintext, says its links were encrypted, and a tcpdump capture of the link holds none of
  the secret bytes: CrypTen's dealer keys, the triple shares it sent, the shares the data
  owner received; SPU's weight shares (received by the data owner) and image shares
  (received by the model owner) over its brpc link;
* channel=plain, the positive control: the same search finds them in the capture, so the
  search can fail.

Needs root, network namespaces, /dev/net/tun, openvpn and tcpdump (scripts/test.sh installs
both where root and apt exist); skipped, with the reason, only without root, netns or tun.
The SPU sessions run where `.venv-spu/` exists.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "mpc_two_namespaces.sh"

CONFIG = """
[run]
timeout_s = 800          # per job: a cap for a loaded host, not the expected time

[dataset]
name = "synthetic"
resolution = 32
n_train_per_site = 16
n_test_per_site = 4

[model]
epochs = 1

[backends.mpc]
max_images = 2
batch_size = 2
timeout_s = 240
"""
IMAGES = 2
CHANNELS = ["tls-vpn", "plain"]
SAMPLES = 100             # byte strings searched per kind of secret


def _netns_or_skip() -> None:
    if find_spec("crypten") is None:
        pytest.skip("needs the [mpc] extra (crypten)")
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces, veth pairs and tunnels")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip` for network namespaces")
    probe = f"cxr-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {made.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)


def _tunnel_tools_or_skip() -> None:
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("no /dev/net/tun: the kernel offers no tun devices here")
    missing = [t for t in ("openvpn", "tcpdump") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: scripts/test.sh installs them (apt-get install "
                    f"{' '.join(missing)}); as root with tun they must exist for this test")


def _leftovers(ns_id: str) -> list[str]:
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return ([line for line in names.splitlines() if ns_id in line]
            + [line for line in links.splitlines() if ns_id in line])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """One vendor model for every variant (trained outside the namespaces: same data, same model)."""
    _netns_or_skip()
    _tunnel_tools_or_skip()
    tmp = tmp_path_factory.mktemp("ns-model")
    config = tmp / "run.toml"
    config.write_text(CONFIG)
    out = tmp / "model.pt"
    proc = subprocess.run([sys.executable, "-m", "suite", "train", "--config", str(config),
                           "--dataset", "synthetic", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return config, out


def _sessions(tmp_path: Path, checkpoint, engines: list[str]) -> dict[str, dict]:
    """One namespace setup (one set of tunnels); in it one session per channel, each one
    benchmark run with an mpc row per engine."""
    config, model = checkpoint
    ns_id = f"t{os.getpid() % 100000}"
    work, record = tmp_path / "work", tmp_path / "record"
    capture = tmp_path / "link.pcap"
    proc = subprocess.Popen(["bash", str(SCRIPT), "--config", str(config), "--checkpoint", str(model),
                             "--work", str(work), "--engine", ",".join(engines),
                             "--channel", ",".join(CHANNELS), "--capture", str(capture)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "MPC_NS_ID": ns_id, "MPC_NS_TIMEOUT": "600",
                                 "MPC_NS_RECORD_DIR": str(record)})
    try:
        out, err = proc.communicate(timeout=2100)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)         # the script's trap removes what it made
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"the namespace sessions took over 2100 s: {err[-2000:]}")
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert not _leftovers(ns_id), "the script left a namespace, veth or tun device behind"
    runs = json.loads((work / "summary.json").read_text())
    assert sorted(runs) == sorted(f"{e}-{c}" for e in engines for c in CHANNELS)
    for name, s in runs.items():
        engine = name.split("-", 1)[0]
        assert s["status"] == ["ok"] and s["n_images"] == IMAGES, (name, s)
        assert s["max_abs_dp"] < 1e-3, (name, s["max_abs_dp"])
        # everything the data owner sent / received crossed its veth (plus headers)
        assert s["data_owner_sent"] > 1e5 and s["data_owner_received"] > 1e5, (name, s)
        assert s["veth_hospital"]["tx_bytes"] >= s["data_owner_sent"]
        assert s["veth_hospital"]["rx_bytes"] >= s["data_owner_received"]
        assert s["model_owner_reported"] == {"sent": s["data_owner_received"],
                                             "received": s["data_owner_sent"]}, (name, s)
        dealer = "0" if engine == "crypten" else "none"
        assert s["vendor_exit"] == {"model_owner": "0", "dealer": dealer}, (name, s)
        assert s["dealer_on"] == ("third" if engine == "crypten" else None)
        assert s["capture_dropped"] == 0, "tcpdump dropped packets: the capture is incomplete"
        assert all(s["checks"].values()), (name, s["checks"])
        pcap = Path(s["capture"]).read_bytes()
        find = _crypten_secrets if engine == "crypten" else _spu_secrets
        s["found"] = find(pcap, record / s["channel"])
        s["ip_protocols"] = _ip_protocols(pcap)
    return runs


def _ip_protocols(capture: bytes) -> dict[int, int]:
    """IPv4 packets per protocol number in a pcap (Ethernet frames): 6 TCP, 17 UDP, 1 ICMP."""
    import struct

    counts: dict[int, int] = {}
    pos = 24                                           # after the global header
    while pos + 16 <= len(capture):
        caplen = struct.unpack_from("<I", capture, pos + 8)[0]
        frame = capture[pos + 16:pos + 16 + caplen]
        if len(frame) > 23 and frame[12:14] == b"\x08\x00":
            counts[frame[23]] = counts.get(frame[23], 0) + 1
        pos += 16 + caplen
    return counts


def _high_entropy(piece: bytes) -> bool:
    return len(set(piece)) >= 12          # no run of zeros or small integers: only random bytes


def _crypten_secrets(capture: bytes, record: Path) -> dict[str, tuple[int, int]]:
    """(found, searched) per kind of secret the parties hold, byte strings searched in the pcap."""
    import torch

    dealer = pickle.loads((record / "dealer_sent.pkl").read_bytes())
    needles = {"dealer keys": list(dealer["keys"]),
               "triple shares sent by the dealer": [p for p in dealer["sent"] if _high_entropy(p[:32])],
               "shares the data owner received": []}
    for name, payload in torch.load(record / "data_owner_batch0.pt", weights_only=False):
        for t in payload if isinstance(payload, (list, tuple)) else [payload]:
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.numel() < 8:
                continue
            raw = t.contiguous().numpy().tobytes()
            # gloo's ring all-reduce sends half of each tensor as the peer's raw share and
            # the other half as a partial sum: sample across the whole tensor
            for start in sorted({len(raw) * k // 8 // 8 * 8 for k in range(8)}):
                piece = raw[start:start + 32]
                if len(piece) == 32 and _high_entropy(piece):
                    needles["shares the data owner received"].append(piece)
    return _search(capture, needles)


def _spu_secrets(capture: bytes, record: Path) -> dict[str, tuple[int, int]]:
    """(found, searched) for SPU: samples of the shares each party received over brpc, the
    model owner's shares of the weights (at the data owner) and the data owner's shares of
    the images (at the model owner), as recorded by backends.mpc.spu_party."""
    needles = {}
    for role, kind, prefix in (("data_owner", "weight shares the data owner received", "share of "),
                               ("model_owner", "image shares the model owner received", "share of x")):
        pieces = []
        for what, data in pickle.loads((record / f"{role}_batch0.pkl").read_bytes()):
            if not what.startswith(prefix):
                continue
            _meta, chunks = pickle.loads(data)
            for raw in chunks:
                for start in sorted({len(raw) * k // 8 // 8 * 8 for k in range(8)}):
                    piece = raw[start:start + 32]
                    if len(piece) == 32 and _high_entropy(piece):
                        pieces.append(piece)
        needles[kind] = pieces
    return _search(capture, needles)


def _search(capture: bytes, needles: dict[str, list[bytes]]) -> dict[str, tuple[int, int]]:
    out = {}
    for kind, pieces in needles.items():
        pieces = [p[:32] for p in pieces][:SAMPLES]        # each search is a pass over the pcap
        out[kind] = (sum(p in capture for p in pieces), len(pieces))
    return out


@pytest.mark.timeout(2400)       # a cap for a loaded host (25 min seen at load 15-20), not the expected time
def test_tunnel_hides_secrets_and_plain_link_shows_them(tmp_path, checkpoint):
    """CrypTen (and SPU where .venv-spu/ exists): the tunnelled session's capture holds none
    of the secret bytes; the plain session's, the positive control, holds them."""
    from backends.mpc.spu_engine import spu_available

    engines = ["crypten"] + (["spu"] if spu_available() else [])
    runs = _sessions(tmp_path, checkpoint, engines)
    for engine in engines:
        tunnel, plain = runs[f"{engine}-tls-vpn"], runs[f"{engine}-plain"]
        assert tunnel["channel"] == "tls-vpn" and tunnel["tunnels_up_at_end"] is True
        assert tunnel["row_channel_encrypted"] == 1.0 and "ENCRYPTED" in tunnel["row_channel_note"]
        assert any("ENCRYPTED" in t for t in tunnel["row_trust_assumptions"]), engine
        assert tunnel["tunnel_setup_s"] > 0
        # no party connection bypassed the tunnels: the link carried no TCP, only their UDP
        assert tunnel["ip_protocols"].get(6, 0) == 0 and tunnel["ip_protocols"].get(17, 0) > 100, \
            (engine, tunnel["ip_protocols"])
        for kind, (found, searched) in tunnel["found"].items():
            assert searched >= 2, f"{engine}: too few {kind} recorded to search for ({searched})"
            assert found == 0, f"{engine}: {found} of {searched} {kind} readable on the link despite the tunnel"

        # positive control: one thing differs, the channel; the same search must find the secrets
        assert plain["row_channel_encrypted"] == 0.0 and "PLAIN TCP" in plain["row_channel_note"]
        assert plain["ip_protocols"].get(6, 0) > 100, (engine, plain["ip_protocols"])
        for kind, (found, searched) in plain["found"].items():
            assert found >= max(2, searched // 4), f"{engine}: only {found} of {searched} {kind} found on the plain link"


def test_script_refuses_without_root_or_netns(tmp_path):
    """Not root: a clear message and exit status 2, before anything is created."""
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv to drop privileges")
    cmd = ["bash", str(SCRIPT), "--work", str(tmp_path / "w")]
    if os.geteuid() == 0:
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] + cmd
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "needs root" in proc.stderr
