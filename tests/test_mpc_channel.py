"""The party links' tunnels (backends/mpc/tunnel.py): up between the right hosts, refused to an
impostor, and the row's channel label checked against the route.

Two network namespaces joined by a veth pair; each runs `python -m backends.mpc.tunnel host`.
With both certificates from the run's CA and the expected names the tunnel comes up (TLS 1.3,
AES-256-GCM) and carries TCP; the positive controls: a peer whose certificate comes from
another CA, or from the right CA under another host's name, gets no tunnel. Needs root,
network namespaces, /dev/net/tun and openvpn (scripts/test.sh installs it as root).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backends.mpc.options import MPCOptions
from backends.mpc.parties import channel_text, check_tunnel_route
from backends.mpc.tunnel import device_name, endpoint_config, make_pki, Peer
from suite.errors import SuiteError

REPO = Path(__file__).resolve().parents[1]
A, B = "10.79.0.1", "10.79.0.2"          # the link
TA, TB = "10.79.1.1", "10.79.1.2"        # inside the tunnel


@pytest.fixture(scope="module")
def two_hosts():
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces and tun devices")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip` for network namespaces")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("no /dev/net/tun: the kernel offers no tun devices here")
    if shutil.which("openvpn") is None:
        pytest.fail("openvpn missing: scripts/test.sh installs it (apt-get install openvpn)")
    tag = f"{os.getpid() % 100000}"
    ns = {"hospital": f"cxr-cha-{tag}", "vendor": f"cxr-chb-{tag}"}
    va, vb = f"cxca{tag}", f"cxcb{tag}"
    made = subprocess.run(["ip", "netns", "add", ns["hospital"]], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {made.stderr.strip()}")
    try:
        cmds = [["ip", "netns", "add", ns["vendor"]],
                ["ip", "link", "add", va, "type", "veth", "peer", "name", vb],
                ["ip", "link", "set", va, "netns", ns["hospital"]],
                ["ip", "link", "set", vb, "netns", ns["vendor"]],
                ["ip", "-n", ns["hospital"], "addr", "add", f"{A}/24", "dev", va],
                ["ip", "-n", ns["vendor"], "addr", "add", f"{B}/24", "dev", vb],
                ["ip", "-n", ns["hospital"], "link", "set", va, "up"],
                ["ip", "-n", ns["vendor"], "link", "set", vb, "up"]]
        for cmd in cmds:
            subprocess.run(cmd, check=True, capture_output=True)
        yield ns, tag
    finally:
        for name in ns.values():
            for pid in subprocess.run(["ip", "netns", "pids", name], capture_output=True,
                                      text=True).stdout.split():
                os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _host(ns: str, pki: Path, me: str, peer: str, underlay: str, overlay: str, peer_under: str,
          peer_over: str, logs: Path, tag: str, timeout_s: float = 30):
    logs.mkdir(parents=True, exist_ok=True)
    ready = logs / f"{me}.ready"
    cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "backends.mpc.tunnel", "host", "--pki", str(pki),
           "--me", me, "--underlay", underlay, "--overlay", overlay,
           "--peer", f"{peer}={peer_under}={peer_over}=1300", "--suffix", tag, "--log-dir", str(logs),
           "--ready-file", str(ready), "--timeout-s", str(timeout_s)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    return proc, ready


def _wait_ready(*readies: Path, timeout_s: float = 60) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(r.exists() and r.read_text().strip() for r in readies):
            return True
        time.sleep(0.1)
    return False


def _stop(*procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait(timeout=20)


@pytest.mark.timeout(240)
def test_tunnel_up_between_the_right_hosts_and_refused_to_impostors(two_hosts, tmp_path):
    ns, tag = two_hosts
    pki, foreign = tmp_path / "pki", tmp_path / "foreign"
    make_pki(pki, ["hospital", "vendor", "dealer"])
    make_pki(foreign, ["vendor"])                  # right name, another CA
    # the impostor trusts both CAs, so the refusal it meets is the hospital's own check
    (foreign / "ca.crt").write_bytes((foreign / "ca.crt").read_bytes() + (pki / "ca.crt").read_bytes())

    # the real pair: up, verified, and carrying TCP to the peer's tunnel address
    h, h_ready = _host(ns["hospital"], pki, "hospital", "vendor", A, TA, B, TB, tmp_path / "ok", tag)
    v, v_ready = _host(ns["vendor"], pki, "vendor", "hospital", B, TB, A, TA, tmp_path / "ok", tag)
    try:
        assert _wait_ready(h_ready, v_ready), h.stderr.read() if h.poll() is not None else "not ready"
        log = (tmp_path / "ok" / "openvpn-hospital-vendor.log").read_text()
        assert "Data Channel: cipher 'AES-256-GCM'" in log and "Control Channel: TLSv1.3" in log
        assert "VERIFY OK: depth=0, CN=vendor" in log
        dev = device_name("hospital", "vendor", tag)
        probe = subprocess.run(["ip", "netns", "exec", ns["hospital"], sys.executable, "-c",
                                f"import socket\ntry: socket.create_connection(('{TB}', 9), 5)\n"
                                f"except OSError as e: print(type(e).__name__)\n"
                                f"import subprocess; print(subprocess.run(['ip','-o','route','get','{TB}'],"
                                f"capture_output=True,text=True).stdout)"],
                               capture_output=True, text=True, timeout=60)
        assert "ConnectionRefusedError" in probe.stdout      # the vendor's kernel answered through the tunnel
        assert f"dev {dev}" in probe.stdout
    finally:
        _stop(h, v)
    assert h.returncode == 0 and v.returncode == 0
    links = subprocess.run(["ip", "-n", ns["hospital"], "-o", "link"], capture_output=True, text=True).stdout
    assert dev not in links, "the tun device outlived its tunnel"

    # positive controls: another CA under the right name; the right CA under another name
    for case, peer_pki, peer_me in (("foreign-ca", foreign, "vendor"), ("wrong-name", pki, "dealer")):
        logs = tmp_path / case
        h, h_ready = _host(ns["hospital"], pki, "hospital", "vendor", A, TA, B, TB, logs, tag, timeout_s=12)
        x, x_ready = _host(ns["vendor"], peer_pki, peer_me, "hospital", B, TB, A, TA, logs, tag, timeout_s=12)
        try:
            h.wait(timeout=60)
        finally:
            _stop(h, x)
        assert h.returncode == 1 and not h_ready.exists(), f"{case}: the hospital accepted an impostor"
        log = (logs / "openvpn-hospital-vendor.log").read_text()
        assert "VERIFY" in log and "ERROR" in log, f"{case}: no verification error in the log"


def test_tunnel_config_pins_cipher_tls_and_peer_name(tmp_path):
    conf = endpoint_config(tmp_path, "hospital", Peer("vendor", B, TB, 1194), A, TA, "tunhv", tmp_path / "l")
    for line in ("data-ciphers AES-256-GCM", "tls-version-min 1.3", "verify-x509-name vendor name",
                 f"ifconfig {TA} {TB}", "tls-server"):
        assert line in conf
    assert "tls-client" in endpoint_config(tmp_path, "vendor", Peer("hospital", A, TA, 1194), B, TB, "t",
                                           tmp_path / "l")


def test_channel_label_and_route_check():
    assert "loopback" in channel_text(MPCOptions())
    assert "PLAIN TCP" in channel_text(MPCOptions(local_parties="data_owner"))
    assert "ENCRYPTED" in channel_text(MPCOptions(local_parties="data_owner", channel="tls-vpn"))
    # the label cannot be claimed over a route that is no tunnel (loopback here)
    with pytest.raises(SuiteError, match="not a tunnel"):
        check_tunnel_route("127.0.0.1")


def test_channel_option_refused_where_it_cannot_hold_and_reported_in_a_row():
    from backends.mpc import MPCBackend

    with pytest.raises(SuiteError, match="channel must be one of plain, tls-vpn"):
        MPCBackend(MPCOptions(channel="tls"))
    with pytest.raises(SuiteError, match="local_parties=data_owner"):
        MPCBackend(MPCOptions(channel="tls-vpn"))        # all-local: loopback, nothing to tunnel
    for channel, value in (("plain", 0.0), ("tls-vpn", 1.0)):
        rows = MPCBackend(MPCOptions(local_parties="data_owner", channel=channel)).extra_rows()
        (row,) = [r for r in rows if r["metric"] == "channel_encrypted"]
        assert row["value"] == value and row["note"] == channel_text(
            MPCOptions(local_parties="data_owner", channel=channel))
