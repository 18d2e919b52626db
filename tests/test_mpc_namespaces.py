"""Two-party CrypTen inference across two network namespaces (scripts/mpc_two_namespaces.sh).

The vendor namespace runs the standalone model owner and dealer (`python -m backends.mpc.crypten_party`),
the hospital namespace runs `suite run --backends plaintext,mpc:local_parties=data_owner`;
the only link between them is a veth pair. Asserts the mpc row exists, matches plaintext
(max |dp| < 1e-3), that the hospital's veth counters moved at least the bytes the data owner
reported, and that the script leaves no namespace, interface or process behind.
Needs root and network namespaces; skipped otherwise. About 45 s on 2 shared cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from importlib.util import find_spec
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "mpc_two_namespaces.sh"

CONFIG = """
[run]
timeout_s = 300

[dataset]
name = "synthetic"
resolution = 32
n_train_per_site = 16
n_test_per_site = 8

[model]
epochs = 1

[backends.mpc]
max_images = 8
batch_size = 8
timeout_s = 120
"""


def _netns_or_skip() -> None:
    if find_spec("crypten") is None:
        pytest.skip("needs the [mpc] extra (crypten)")
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces and a veth pair")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip` for network namespaces")
    probe = f"cxr-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {made.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)


def _leftovers(ns_id: str) -> list[str]:
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return ([line for line in names.splitlines() if ns_id in line]
            + [line for line in links.splitlines() if f"cxrh{ns_id}" in line or f"cxrv{ns_id}" in line])


@pytest.mark.timeout(240)
def test_mpc_across_two_namespaces(tmp_path):
    _netns_or_skip()
    config = tmp_path / "run.toml"
    config.write_text(CONFIG)
    ns_id = f"t{os.getpid() % 100000}"
    work = tmp_path / "work"
    proc = subprocess.run(["bash", str(SCRIPT), "--config", str(config), "--work", str(work)],
                          capture_output=True, text=True, cwd=REPO, timeout=220,
                          env={**os.environ, "MPC_NS_ID": ns_id, "MPC_NS_TIMEOUT": "200"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not _leftovers(ns_id), "the script left a namespace or veth behind"

    s = json.loads((work / "summary.json").read_text())
    assert s["status"] == ["ok"] and s["n_images"] == 8
    assert s["max_abs_dp"] < 1e-3
    # everything the data owner sent / received crossed the veth (plus TCP/IP headers)
    assert s["data_owner_sent"] > 1e6 and s["data_owner_received"] > 1e6
    assert s["veth_hospital"]["tx_bytes"] >= s["data_owner_sent"]
    assert s["veth_hospital"]["rx_bytes"] >= s["data_owner_received"]
    assert s["veth_hospital"]["tx_bytes"] < 1.5 * s["data_owner_sent"]      # nothing else on it
    # the vendor's own counts agree with the hospital's
    assert s["model_owner_reported"] == {"sent": s["data_owner_received"],
                                         "received": s["data_owner_sent"]}
    assert s["vendor_exit"] == {"model_owner": "0", "dealer": "0"}
    assert all(s["checks"].values()), s["checks"]


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
