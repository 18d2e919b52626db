"""The simulated part: a hardware vendor, a CPU that measures and signs, and the enclave process.

Everything the hardware would enforce (memory isolation, a key fused into the chip)
is simulated: the enclave is an ordinary child process of the worker, and the vendor's
signing key reaches it on the child's stdin at launch. Everything else is real: the
child measures the code it is about to run and runs exactly those bytes, reports are
real Ed25519 signatures, and all traffic goes over a real socket pair.

Process layout:

    worker (data owner + model owner roles, untrusted host)
      └── python -m backends.tee.hardware   (the enclave; same process group, so the
            harness's kill_tree reaches it; it exits on EOF when the worker dies)

Launch parameters (vendor key, configuration) travel on the child's stdin; every
protocol message travels on the socket pair and is what `PipeChannel` counts.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# The enclave's code: measured at launch, and loaded from exactly the measured bytes.
# Libraries (torch, torchxrayvision, numpy, cryptography) are pinned by version in the
# measured configuration instead of by hash.
MEASURED_MODULES = ("backends", "backends.tee", "backends.tee.protocol", "backends.tee.enclave", "suite.models", "suite.errors")


def read_sources(names: tuple[str, ...] = MEASURED_MODULES) -> dict[str, bytes]:
    """Source bytes of the enclave modules, found without importing (executing) them."""
    out = {}
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin:
            raise FileNotFoundError(f"enclave module {name} not found")
        out[name] = Path(spec.origin).read_bytes()
    return out


def expected_code_hash() -> bytes:
    """The client's own computation of the code measurement, from its copy of the sources."""
    from backends.tee.protocol import code_digest

    return code_digest(read_sources())


class SimulatedVendor:
    """The hardware vendor: its private key goes into the (simulated) CPU; clients pin the public key."""

    def __init__(self, private_raw: bytes) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        self._private_raw = private_raw
        key = Ed25519PrivateKey.from_private_bytes(private_raw)
        self.public_bytes = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @classmethod
    def generate(cls) -> "SimulatedVendor":
        return cls(os.urandom(32))

    def fuse_into_cpu(self) -> str:
        """The key material the simulated CPU is launched with (hex)."""
        return self._private_raw.hex()


class SimulatedCPU:
    """Measurement registers and the report instruction, inside the enclave process."""

    def __init__(self, vendor_private_hex: str, code_hash: bytes, config_hash: bytes) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        self._key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(vendor_private_hex))
        self._code_hash, self._config_hash = code_hash, config_hash
        self._model_hash: bytes | None = None

    def extend_model(self, digest: bytes) -> None:
        """Record the loaded model's digest; a register that can be written once."""
        if self._model_hash is not None:
            raise RuntimeError("model register already extended")
        self._model_hash = digest

    def report(self, report_data: bytes) -> bytes:
        from backends.tee import protocol as P

        measured = P.Measurement(self._code_hash, self._model_hash or P.NO_MODEL, self._config_hash)
        return P.sign_report(measured, report_data, self._key)


class _MeasuredFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the measured modules from the bytes that were hashed (no time-of-check gap)."""

    def __init__(self, sources: dict[str, bytes], origins: dict[str, str]) -> None:
        self.sources, self.origins = sources, origins

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.sources:
            return None
        return importlib.util.spec_from_loader(fullname, self, origin=self.origins[fullname])

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        module.__file__ = self.origins[module.__name__]
        exec(compile(self.sources[module.__name__], module.__file__, "exec"), module.__dict__)


def _enclave_main() -> int:
    """Entry point of the enclave process: measure, load measured code, serve."""
    from multiprocessing.connection import Connection

    launch = json.loads(sys.stdin.readline())
    sys.stdin.close()
    conn = Connection(int(launch["fd"]))
    origins = {n: importlib.util.find_spec(n).origin for n in MEASURED_MODULES}
    sources = read_sources()
    sys.meta_path.insert(0, _MeasuredFinder(sources, origins))
    from backends.tee import protocol as P   # noqa: E402 - the measured copy, via the finder

    config_bytes = launch["config"].encode()
    cpu = SimulatedCPU(launch["vendor_key"], P.code_digest(sources), P.sha256(config_bytes))
    from backends.tee import enclave as tee_enclave

    return tee_enclave.serve(conn, cpu, json.loads(config_bytes))


# --- the untrusted host's side -----------------------------------------------------------------

class PipeChannel:
    """The host's end of the socket pair: send/recv whole blobs, never hang on a dead enclave."""

    def __init__(self, conn: Any, process: subprocess.Popen, reply_timeout_s: float) -> None:
        self._conn, self._process = conn, process
        self.reply_timeout_s = reply_timeout_s

    def send(self, data: bytes) -> None:
        try:
            self._conn.send_bytes(data)
        except (OSError, EOFError, ValueError) as exc:
            raise self._gone(f"sending ({type(exc).__name__})") from None

    def recv(self, what: str) -> bytes:
        from backends.tee.protocol import EnclaveUnavailableError

        deadline = time.monotonic() + self.reply_timeout_s
        while True:
            try:
                if self._conn.poll(0.05):
                    return self._conn.recv_bytes()
            except (OSError, EOFError, ValueError):
                raise self._gone(f"waiting for the {what}") from None
            if self._process.poll() is not None:
                raise self._gone(f"waiting for the {what}")
            if time.monotonic() > deadline:
                raise EnclaveUnavailableError(
                    f"enclave (pid {self._process.pid}) sent no {what} within "
                    f"{self.reply_timeout_s:g} s (option reply_timeout_s)")

    def _gone(self, doing: str) -> Exception:
        from backends.tee.protocol import EnclaveUnavailableError

        try:
            code = self._process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            code = None
        how = "closed its channel" if code is None else f"exited with code {code}"
        return EnclaveUnavailableError(f"enclave process (pid {self._process.pid}) {how} while "
                                       f"{doing}: it was killed or crashed")

    def close(self) -> None:
        self._conn.close()


class EnclaveProcess:
    """Launch and stop the enclave child; `channel` is the only way to talk to it."""

    def __init__(self, process: subprocess.Popen, channel: PipeChannel) -> None:
        self.process, self.channel = process, channel

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    def launch(cls, vendor: SimulatedVendor, config: dict[str, Any],
               reply_timeout_s: float = 600.0) -> "EnclaveProcess":
        from multiprocessing.connection import Connection

        from backends.tee.protocol import canonical_config

        host_sock, enclave_sock = socket.socketpair()
        repo = str(Path(__file__).resolve().parents[2])   # the repo root
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)}
        fd = enclave_sock.fileno()
        try:
            process = subprocess.Popen([sys.executable, "-m", "backends.tee.hardware"],
                                       stdin=subprocess.PIPE, pass_fds=(fd,), env=env)
        except BaseException:
            host_sock.close()
            raise
        finally:
            enclave_sock.close()   # the child holds its own copy; EOF reaches us if it dies
        launch = {"fd": fd, "vendor_key": vendor.fuse_into_cpu(),
                  "config": canonical_config(config).decode()}
        try:
            process.stdin.write((json.dumps(launch) + "\n").encode())
            process.stdin.close()
        except OSError:
            pass   # the child died at once; the first recv reports it
        conn = Connection(host_sock.detach())
        return cls(process, PipeChannel(conn, process, reply_timeout_s))

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace_s: float = 5.0) -> int | None:
        """Wait for a closed enclave to exit; terminate, then kill, one that does not."""
        self.channel.close()     # the enclave sees EOF and exits if it has not already
        for signal_it, wait_s in ((None, grace_s), (self.process.terminate, 2.0),
                                  (self.process.kill, 5.0)):
            if signal_it is not None and self.process.poll() is None:
                signal_it()
            try:
                return self.process.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
        return None


if __name__ == "__main__":
    code = _enclave_main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)   # skip interpreter teardown: torch's takes seconds and there is nothing to save
