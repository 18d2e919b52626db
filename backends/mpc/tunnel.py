"""Encrypted, authenticated links between MPC hosts: one OpenVPN tunnel per host pair.

CrypTen's gloo transport has no TLS and listens on ephemeral ports it announces at run
time, so per-port TLS wrappers (stunnel) do not fit; an IP tunnel carries every port. Each
pair of hosts gets its own point-to-point OpenVPN link (UDP, TLS 1.3 handshake with mutual
certificate authentication, AES-256-GCM data channel), so no third host ever sees a pair's
traffic in the clear (a hub would decrypt and re-encrypt everyone's). Every host has one
overlay address, the local end of all its tunnels, so gloo binds once
(GLOO_SOCKET_IFNAME = any of its tun devices) and reaches each peer through that pair's tun.

Keys: a per-run CA and one certificate per host, Ed25519 keys made from os.urandom with
`cryptography`; each end checks the CA signature and the peer's exact common name.

    python -m backends.mpc.tunnel pki DIR HOST [HOST ...]
    python -m backends.mpc.tunnel host --pki DIR --me NAME --peer NAME=UNDERLAY=OVERLAY[=PORT] ...
           --underlay ADDR --overlay ADDR [--log-dir DIR] [--ready-file FILE]

`host` starts this host's ends (one openvpn process per peer), waits until every tunnel
has completed its handshake with the expected cipher, prints the setup time, and stays
in the foreground until SIGTERM/SIGINT, when it stops them.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CIPHER = "AES-256-GCM"
READY = "Initialization Sequence Completed"


class TunnelError(RuntimeError):
    """A tunnel could not be built or broke: the party links are not protected."""


# ------------------------------------------------------------------ keys and certificates

def make_pki(directory: Path, hosts: list[str], days: int = 2) -> None:
    """A fresh CA and one certificate per host under `directory` (ca.crt, HOST.crt, HOST.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def key() -> ed25519.Ed25519PrivateKey:
        return ed25519.Ed25519PrivateKey.from_private_bytes(os.urandom(32))

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def serial() -> int:
        return int.from_bytes(os.urandom(16), "big") >> 1

    ca_key = key()
    ca_name = name(f"cxr-mpc-run-ca-{os.urandom(4).hex()}")     # distinct per run
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(serial())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                         critical=True)
          .sign(ca_key, None))
    (directory / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for host in hosts:
        k = key()
        cert = (x509.CertificateBuilder().subject_name(name(host)).issuer_name(ca_name)
                .public_key(k.public_key()).serial_number(serial())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                               critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(ca_key, None))
        (directory / f"{host}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        path = directory / f"{host}.key"
        path.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
        path.chmod(0o600)


# ------------------------------------------------------------------ one tunnel end

@dataclass
class Peer:
    name: str
    underlay: str        # the peer's address on the untrusted network
    overlay: str         # the peer's address inside the tunnels
    port: int            # UDP port of this pair's tunnel (the same on both ends)


def device_name(me: str, peer: str, suffix: str = "") -> str:
    """tun device of the pair (at most 15 characters): 'tun' + both initials + suffix."""
    return f"tun{me[0]}{peer[0]}{suffix}"[:15]


def endpoint_config(pki: Path, me: str, peer: Peer, underlay: str, overlay: str, dev: str,
                    log: Path) -> str:
    """OpenVPN point-to-point config of this host's end of the tunnel to `peer`. The end with
    the lower link address is the TLS server; both verify the other's certificate and name."""
    server = ipaddress.ip_address(underlay) < ipaddress.ip_address(peer.underlay)
    role = "tls-server\ndh none" if server else "tls-client"
    return f"""# backends.mpc.tunnel: {me} <-> {peer.name}
dev {dev}
dev-type tun
proto udp
local {underlay}
lport {peer.port}
remote {peer.underlay}
rport {peer.port}
ifconfig {overlay} {peer.overlay}
{role}
ca {pki / 'ca.crt'}
cert {pki / f'{me}.crt'}
key {pki / f'{me}.key'}
verify-x509-name {peer.name} name
remote-cert-eku "TLS Web Server Authentication"
tls-version-min 1.3
data-ciphers {CIPHER}
data-ciphers-fallback {CIPHER}
auth SHA256
ping 2
ping-exit 60
script-security 1
verb 3
log {log}
"""


class Host:
    """This host's tunnel ends, one openvpn process per peer."""

    def __init__(self, pki: Path, me: str, underlay: str, overlay: str, peers: list[Peer],
                 log_dir: Path, suffix: str = "") -> None:
        self.pki, self.me, self.underlay, self.overlay = pki, me, underlay, overlay
        self.peers, self.log_dir, self.suffix = peers, log_dir, suffix
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.setup_s = 0.0

    def start(self, timeout_s: float = 60.0) -> None:
        openvpn = shutil.which("openvpn")
        if openvpn is None:
            raise TunnelError("openvpn is not installed (Debian: apt-get install openvpn)")
        if not os.path.exists("/dev/net/tun"):
            raise TunnelError("/dev/net/tun is missing: the kernel offers no tun devices here")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        for peer in self.peers:
            dev = device_name(self.me, peer.name, self.suffix)
            log = self.log_dir / f"openvpn-{self.me}-{peer.name}.log"
            conf = self.log_dir / f"openvpn-{self.me}-{peer.name}.conf"
            conf.write_text(endpoint_config(self.pki, self.me, peer, self.underlay, self.overlay, dev, log))
            log.write_text("")
            self.logs[peer.name] = log
            self.procs[peer.name] = subprocess.Popen([openvpn, "--config", str(conf)],
                                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        self.wait_ready(timeout_s)
        self.setup_s = time.perf_counter() - t0

    def wait_ready(self, timeout_s: float) -> None:
        """Every tunnel up, with the peer's certificate verified and the expected cipher."""
        deadline = time.monotonic() + timeout_s
        pending = set(self.procs)
        while pending:
            for name in sorted(pending):
                text = self.logs[name].read_text(errors="replace")
                code = self.procs[name].poll()
                if code is not None:
                    raise TunnelError(f"openvpn to {name} exited ({code}): {_last_error(text)}")
                cipher = re.search(r"Data Channel: cipher '([^']+)'", text)
                if READY in text and cipher:
                    if cipher[1] != CIPHER or "Control Channel: TLSv1.3" not in text:
                        raise TunnelError(f"tunnel to {name} negotiated data cipher {cipher[1]}, not "
                                          f"{CIPHER} with a TLS 1.3 control channel")
                    if f"VERIFY OK: depth=0, CN={name}" not in text:
                        raise TunnelError(f"tunnel to {name}: peer certificate not verified as CN={name}")
                    pending.discard(name)
            if pending and time.monotonic() > deadline:
                raise TunnelError(f"tunnel(s) to {', '.join(sorted(pending))} not up within "
                                  f"{timeout_s:.0f} s (logs in {self.log_dir})")
            time.sleep(0.05)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def broken(self) -> list[str]:
        return [name for name, proc in self.procs.items() if proc.poll() is not None]


def _last_error(text: str) -> str:
    lines = [ln for ln in text.splitlines() if re.search(r"error|fail|cannot|refused|options", ln, re.I)]
    return (lines or text.splitlines() or ["(empty log)"])[-1][-300:]


def is_tunnel_device(dev: str) -> bool:
    """A tun device (what OpenVPN creates) rather than an Ethernet or loopback interface."""
    return Path(f"/sys/class/net/{dev}/tun_flags").exists()


def route_device(addr: str) -> str | None:
    """The interface this host would send to `addr` through (`ip route get`)."""
    try:
        out = subprocess.run(["ip", "-o", "route", "get", addr], capture_output=True, text=True,
                             timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"\bdev (\S+)", out)
    return m[1] if m else None


# ------------------------------------------------------------------ command line

def _peer(text: str) -> Peer:
    parts = text.split("=")
    if len(parts) not in (3, 4):
        raise argparse.ArgumentTypeError(f"--peer wants NAME=UNDERLAY=OVERLAY[=PORT], got '{text}'")
    return Peer(parts[0], parts[1], parts[2], int(parts[3]) if len(parts) == 4 else 1194)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m backends.mpc.tunnel", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("pki", help="a per-run CA and one certificate per host")
    k.add_argument("dir", type=Path)
    k.add_argument("hosts", nargs="+")
    h = sub.add_parser("host", help="this host's tunnel ends; stays up until SIGTERM")
    h.add_argument("--pki", type=Path, required=True)
    h.add_argument("--me", required=True)
    h.add_argument("--underlay", required=True, help="this host's address on the untrusted network")
    h.add_argument("--overlay", required=True, help="this host's address inside the tunnels")
    h.add_argument("--peer", type=_peer, action="append", required=True)
    h.add_argument("--log-dir", type=Path, default=Path("."))
    h.add_argument("--suffix", default="", help="appended to the tun device names")
    h.add_argument("--ready-file", type=Path, help="written (setup seconds) once every tunnel is up")
    h.add_argument("--timeout-s", type=float, default=60.0)
    a = p.parse_args(argv)
    if a.cmd == "pki":
        make_pki(a.dir, a.hosts)
        return 0
    host = Host(a.pki, a.me, a.underlay, a.overlay, a.peer, a.log_dir, a.suffix)
    stop = {"now": False}

    def on_signal(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        host.start(a.timeout_s)
        print(f"[tunnel] {a.me}: {len(a.peer)} tunnel(s) up in {host.setup_s:.2f} s "
              f"({', '.join(f'{pe.name} via {device_name(a.me, pe.name, a.suffix)}' for pe in a.peer)}; "
              f"{CIPHER}, TLS 1.3, certificates verified)", file=sys.stderr, flush=True)
        if a.ready_file:
            a.ready_file.write_text(f"{host.setup_s:.3f}\n")
        while not stop["now"]:
            gone = host.broken()
            if gone:
                raise TunnelError(f"openvpn to {', '.join(gone)} exited: the link is down")
            time.sleep(0.2)
    except TunnelError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        host.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
