"""One session of scripts/mpc_two_namespaces.sh: read its mpc rows (one per engine), print the
figures, check them.

    python scripts/mpc_ns_summary.py RUN_DIR SESSION_DIR BEFORE_H AFTER_H BEFORE_V AFTER_V \
        EXITS CHANNEL DEALER_ON TUNNEL_SETUP_S TUNNELS_UP CAPTURE

EXITS: ENGINE=OWNER/DEALER,... the vendor processes' exit statuses ("none": no dealer, SPU).
Writes SESSION_DIR/summary.json ({engine: figures}) and exits 1 if a check fails. The veth
counters cover the whole session, so they are checked against the sum over the engines.
(A script of its own so the shell script stays a sequence of steps.)
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pandas as pd


def main(argv: list[str]) -> int:
    run_dir, work = Path(argv[0]), Path(argv[1])
    before_h, after_h, before_v, after_v = (list(map(int, a.split())) for a in argv[2:6])
    exits = {e: dict(zip(("model_owner", "dealer"), v.split("/")))
             for e, v in (item.split("=") for item in argv[6].split(","))}
    channel, dealer_on, tunnel_setup_s, tunnels_up, capture = argv[7:12]
    rows = pd.read_json(run_dir / "results.jsonl", lines=True)
    d_h = [a - b for a, b in zip(after_h, before_h)]
    d_v = [a - b for a, b in zip(after_v, before_v)]
    session = {
        "veth_hospital": dict(zip(("rx_bytes", "tx_bytes", "rx_packets", "tx_packets"), d_h)),
        "veth_vendor": dict(zip(("rx_bytes", "tx_bytes", "rx_packets", "tx_packets"), d_v)),
        "channel": channel,
        "tunnel_setup_s": float(tunnel_setup_s) if channel == "tls-vpn" else None,
        "tunnels_up_at_end": tunnels_up == "true" if channel == "tls-vpn" else None,
        "capture": capture or None,
    }
    if capture:
        text = (work / "capture.log").read_text()
        m, d = re.search(r"(\d+) packets captured", text), re.search(r"(\d+) packets dropped by kernel", text)
        session["capture_packets"] = int(m[1]) if m else None
        session["capture_dropped"] = int(d[1]) if d else None
    out, ok = {}, True
    for engine, vendor_exit in exits.items():
        mpc = rows[(rows.backend == "mpc") & (rows.backend_id.str.contains("engine=spu") == (engine == "spu"))]
        if mpc.empty:
            print(f"error: the run has no mpc row for engine {engine}", file=sys.stderr)
            return 1
        s, checks = engine_summary(mpc, engine, work / "vendor" / f"model_owner-{engine}.log", session,
                                   vendor_exit, dealer_on)
        out[engine] = s
        ok &= all(checks.values())
        print_summary(s, checks)
    sent = sum(s["data_owner_sent"] for s in out.values())
    received = sum(s["data_owner_received"] for s in out.values())
    veth = {"hospital veth tx >= data owner bytes sent (all engines)": d_h[1] >= sent > 0,
            "hospital veth rx >= data owner bytes received (all engines)": d_h[0] >= received > 0}
    if channel == "tls-vpn":
        veth["tunnels stayed up to the end"] = session["tunnels_up_at_end"]
    for s in out.values():
        s["checks"].update({k: bool(v) for k, v in veth.items()})
    ok &= all(veth.values())
    (work / "summary.json").write_text(json.dumps(out, indent=2))
    mb = 1e6
    print(f"session {channel}: " + ("OpenVPN tunnels between every pair of hosts, up in "
                                     f"{session['tunnel_setup_s']:.2f} s" if channel == "tls-vpn"
                                     else "PLAIN TCP on the link (insecure)"))
    if capture:
        print(f"  capture    {capture}: {session['capture_packets']} packets, "
              f"{session['capture_dropped']} dropped by the kernel")
    print(f"  veth       hospital tx {d_h[1]} B ({d_h[3]} packets), rx {d_h[0]} B ({d_h[2]} packets): "
          f"{d_h[1] / max(sent, 1):.3f}x / {d_h[0] / max(received, 1):.3f}x the bytes the data owner(s) "
          f"reported ({sent / mb:.3f} / {received / mb:.3f} MB)")
    for name, good in veth.items():
        print(f"  [{'ok' if good else 'FAILED'}] {name}")
    print(f"summary: {work / 'summary.json'}")
    return 0 if ok else 1


def engine_summary(mpc: pd.DataFrame, engine: str, owner_log: Path, session: dict, vendor_exit: dict,
                   dealer_on: str) -> tuple[dict, dict]:
    def value(metric, total=False, **where):
        sel = mpc[mpc.metric == metric]
        for k, v in where.items():
            sel = sel[sel[k] == v]
        if total:                      # summed over phases (setup + online)
            return float(sel.value.sum())
        return float(sel.value.iloc[0]) if len(sel) else None

    status = sorted(set(mpc.status.dropna()))
    # what the vendor's model owner reported (its own counters, on its stderr)
    owner = {"sent": 0, "received": 0}
    for m in re.finditer(r"\[model_owner\] \w+: sent (\d+) B, received (\d+) B", owner_log.read_text()):
        owner["sent"] += int(m[1])
        owner["received"] += int(m[2])
    note = mpc[mpc.metric == "channel_encrypted"].note
    channel = session["channel"]
    s = {
        "engine": engine, "backend_id": mpc.backend_id.iloc[0], "status": status,
        "n_images": value("n_images"),
        "max_abs_dp": value("max_abs_diff", label="__all__", site="__all__"),
        "mean_abs_dp": value("mean_abs_diff", label="__all__", site="__all__"),
        "latency_per_image_p50_s": value("latency_per_image_p50"),
        "setup_time_s": value("setup_time"), "wall_time_s": value("wall_time"),
        "bytes_sent": value("bytes_sent"), "bytes_received": value("bytes_received"),    # online
        # everything the data owner sent / received over the MPC channel, setup included
        "data_owner_sent": value("party_bytes_sent", total=True, party="data_owner"),
        "data_owner_received": value("party_bytes_received", total=True, party="data_owner"),
        "bytes_per_image": value("bytes_per_image"),
        "rounds": value("rounds"),                                   # CrypTen; SPU counts none
        "messages_per_image": value("party_messages_per_image", party="data_owner"),     # SPU
        "data_owner_cpu_per_image_s": value("party_cpu_time_per_image", party="data_owner"),
        "model_owner_reported": owner,
        "vendor_exit": vendor_exit,
        "dealer_on": dealer_on if engine == "crypten" else None,
        "row_channel_encrypted": value("channel_encrypted"),
        "row_channel_note": note.iloc[0] if len(note) else None,
        "row_trust_assumptions": list(mpc.tm_trust_assumptions.iloc[0]),
        **session,
    }
    checks = {
        "mpc rows ok": status == ["ok"] and s["n_images"],
        "fidelity max |dp| < 1e-3": s["max_abs_dp"] is not None and s["max_abs_dp"] < 1e-3,
        "the row says which channel it had": s["row_channel_encrypted"] == (1.0 if channel == "tls-vpn" else 0.0),
        "model owner's own counts match the data owner's": (owner["sent"], owner["received"])
                                                           == (s["data_owner_received"], s["data_owner_sent"]),
        "vendor parties exited cleanly": vendor_exit["model_owner"] == "0"
                                         and vendor_exit["dealer"] in ("0", "none"),
    }
    s["checks"] = {k: bool(v) for k, v in checks.items()}
    return s, checks


def print_summary(s: dict, checks: dict) -> None:
    mb = 1e6
    owner = s["model_owner_reported"]
    print(f"mpc row {s['backend_id']}: {s['n_images']:.0f} images, status {','.join(s['status'])}")
    print(f"  fidelity   max |dp| {s['max_abs_dp']:.2e}, mean |dp| {s['mean_abs_dp']:.2e} (vs plaintext)")
    print(f"  latency    {s['latency_per_image_p50_s'] * 1e3:.0f} ms/image (p50), setup {s['setup_time_s']:.1f} s, "
          f"data owner CPU {s['data_owner_cpu_per_image_s'] * 1e3:.0f} ms/image")
    steps = (f"{s['rounds']:.0f} rounds" if s["rounds"] is not None else
             f"{s['messages_per_image'] or 0:.0f} messages/image (SPU counts no rounds)")
    print(f"  online     data owner sent {s['bytes_sent'] / mb:.3f} MB, received {s['bytes_received'] / mb:.3f} MB, "
          f"{steps} ({s['bytes_per_image'] / mb:.3f} MB/image)")
    print(f"  reported   with setup: data owner sent {s['data_owner_sent']:.0f} B, received "
          f"{s['data_owner_received']:.0f} B; model owner (vendor log) sent {owner['sent']} B, "
          f"received {owner['received']} B")
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAILED'}] {name}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
