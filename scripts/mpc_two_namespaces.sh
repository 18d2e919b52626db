#!/usr/bin/env bash
# Two-party CrypTen secure inference across two network namespaces on one machine.
#
#   sudo scripts/mpc_two_namespaces.sh [--config RUN.toml] [--checkpoint MODEL.pt]
#                                      [--work DIR] [--port P] [--mtu N] [--port-range LO-HI] [--quick]
#
# Two namespaces, "hospital" and "vendor", joined only by a veth pair with private addresses
# (each namespace has its own lo and its veth end, nothing else: no loopback shortcut):
#   vendor    10.77.0.2  trains (or is given) the model, then runs the model owner (party 0,
#                        which hosts the rendezvous) and the triple dealer (party 2):
#                        `python -m backends.mpc.crypten_party model-owner|dealer ...`
#   hospital  10.77.0.1  runs the benchmark: `python -m suite run --backends
#                        plaintext,mpc:local_parties=data_owner`; it starts only the data
#                        owner (party 1); plaintext is there only as the fidelity reference
# Then it prints the mpc row's fidelity (max |dp| vs plaintext), latency and bytes, and checks
# that the hospital's veth counters moved at least the bytes the data owner reported.
# Everything it starts is killed and both namespaces (with the veth pair) are deleted on any
# exit, failure or Ctrl-C included.
#
# Options:
#   --config FILE      run config (TOML: [dataset], [model], [backends.mpc]); default: the
#                      synthetic data at 64 px, 32 train + 8 test images per site, 2 epochs,
#                      mpc max_images=8
#   --checkpoint FILE  the vendor's model; default: the vendor trains one with `suite train`
#                      on the config's dataset (it must not have seen the run's test images)
#   --work DIR         logs, checkpoint, run folder and summary.json (default: a new temp dir)
#   --port P           rendezvous port on the vendor (default 29517)
#   --mtu N            veth MTU (default 1500, as on Ethernet; loopback has 65536)
#   --port-range LO-HI ephemeral port range in both namespaces (net.ipv4.ip_local_port_range),
#                      which is where gloo's listening sockets are: what a firewall must open
#   --quick            pass --quick to `suite run`
# Environment: PYTHON (default <repo>/.venv/bin/python), MPC_NS_ID (suffix for the namespace
# and interface names, default this shell's pid), MPC_NS_TIMEOUT (seconds for the whole
# benchmark run, default 900).
# Exit status: 0 all checks passed; 1 a check or a step failed; 2 cannot run here (not root,
# no `ip netns`).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
CONFIG="" CHECKPOINT="" WORK="" PORT=29517 MTU=1500 PORT_RANGE="" QUICK=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config) CONFIG="$(realpath "$2")"; shift 2 ;;
    --checkpoint) CHECKPOINT="$(realpath "$2")"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --mtu) MTU="$2"; shift 2 ;;
    --port-range) PORT_RANGE="$2"; shift 2 ;;
    --quick) QUICK=(--quick); shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

if [ "$(id -u)" != 0 ]; then
  echo "error: needs root (creates network namespaces and a veth pair); run it with sudo" >&2
  exit 2
fi
if ! command -v ip >/dev/null 2>&1 || ! ip netns list >/dev/null 2>&1; then
  echo "error: 'ip netns' is unavailable (install iproute2; the kernel needs network namespaces)" >&2
  exit 2
fi

ID="${MPC_NS_ID:-$$}"
NS_H="cxr-hospital-$ID" NS_V="cxr-vendor-$ID"
VETH_H="cxrh$ID" VETH_V="cxrv$ID"          # interface names: at most 15 characters
VETH_H="${VETH_H:0:15}" VETH_V="${VETH_V:0:15}"
ADDR_H=10.77.0.1 ADDR_V=10.77.0.2
WORK="${WORK:-$(mktemp -d /tmp/mpc-netns.XXXXXX)}"
mkdir -p "$WORK/vendor" "$WORK/hospital"
WORK="$(realpath "$WORK")"
PIDS=()
MADE=()           # what this run created: "ns NAME" / "link NAME"; cleanup removes only these

log() { echo "[netns] $*" >&2; }

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  set +eu
  # every process we started, then anything still running inside our namespaces
  # (the benchmark's workers and the data owner are children of the hospital's run)
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  local item ns
  for item in "${MADE[@]}"; do
    [ "${item%% *}" = ns ] || continue
    for pid in $(ip netns pids "${item#ns }" 2>/dev/null); do kill -TERM "$pid" 2>/dev/null; done
  done
  sleep 1
  for item in "${MADE[@]}"; do
    [ "${item%% *}" = ns ] || continue
    for pid in $(ip netns pids "${item#ns }" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
  done
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
  for item in "${MADE[@]}"; do
    case "$item" in
      # a veth still in the root namespace (moving it failed); deleting one end deletes the pair
      link\ *) ip link del "${item#link }" 2>/dev/null ;;
      # deleting a namespace deletes the veth end inside it, and with it the pair
      ns\ *) ip netns del "${item#ns }" ;;
    esac
  done
  [ ${#MADE[@]} -gt 0 ] && log "cleaned up: ${MADE[*]} (work dir $WORK)"
  exit "$status"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

# ------------------------------------------------------------------ network
for ns in "$NS_H" "$NS_V"; do
  if ip netns list | grep -qw "$ns"; then
    echo "error: namespace $ns already exists (set MPC_NS_ID to another value)" >&2
    exit 1
  fi
done
if ip link show "$VETH_H" >/dev/null 2>&1 || ip link show "$VETH_V" >/dev/null 2>&1; then
  echo "error: interface $VETH_H or $VETH_V already exists (set MPC_NS_ID to another value)" >&2
  exit 1
fi
ip netns add "$NS_H"; MADE+=("ns $NS_H")
ip netns add "$NS_V"; MADE+=("ns $NS_V")
ip link add "$VETH_H" type veth peer name "$VETH_V"; MADE+=("link $VETH_H")
ip link set "$VETH_H" netns "$NS_H"
ip link set "$VETH_V" netns "$NS_V"
ip -n "$NS_H" addr add "$ADDR_H/30" dev "$VETH_H"
ip -n "$NS_V" addr add "$ADDR_V/30" dev "$VETH_V"
for ns in "$NS_H" "$NS_V"; do ip -n "$ns" link set lo up; done
ip -n "$NS_H" link set "$VETH_H" mtu "$MTU" up
ip -n "$NS_V" link set "$VETH_V" mtu "$MTU" up
if [ -n "$PORT_RANGE" ]; then          # per namespace, like on two hosts
  for ns in "$NS_H" "$NS_V"; do
    ip netns exec "$ns" sysctl -q -w net.ipv4.ip_local_port_range="${PORT_RANGE/-/ }"
  done
  log "ephemeral ports (gloo's listeners) limited to $PORT_RANGE in both namespaces"
fi
log "hospital $NS_H: $(ip -n "$NS_H" -brief addr show | tr -s ' ' | paste -sd';')"
log "vendor   $NS_V: $(ip -n "$NS_V" -brief addr show | tr -s ' ' | paste -sd';')"
log "route hospital -> vendor: $(ip -n "$NS_H" route get "$ADDR_V" | head -1 | tr -s ' ')"

# the only way from the hospital to the vendor is the veth pair
for _ in $(seq 50); do
  ip netns exec "$NS_H" "$PY" -c "import socket; socket.create_connection(('$ADDR_V', 9), 0.2)" \
    2>&1 | grep -q "refused" && break
  sleep 0.1
done

counters() {  # NS DEV -> "rx_bytes tx_bytes rx_packets tx_packets"
  ip netns exec "$1" sh -c "cd /sys/class/net/$2/statistics && cat rx_bytes tx_bytes rx_packets tx_packets" | paste -sd' '
}

# ------------------------------------------------------------------ configuration
if [ -z "$CONFIG" ]; then
  CONFIG="$WORK/run.toml"
  cat >"$CONFIG" <<'EOF'
# scripts/mpc_two_namespaces.sh default: small synthetic run
[run]
timeout_s = 600

[dataset]
name = "synthetic"
resolution = 64
n_train_per_site = 32
n_test_per_site = 8

[model]
epochs = 2

[backends.mpc]
max_images = 8
batch_size = 8
EOF
fi
DATASET="$("$PY" -c "import sys; from suite.config import load_config; print(load_config(sys.argv[1]).dataset.name)" "$CONFIG")"

# ------------------------------------------------------------------ vendor: the model
cd "$ROOT"
export OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1
if [ -z "$CHECKPOINT" ]; then
  CHECKPOINT="$WORK/vendor/model.pt"
  log "vendor trains its model: suite train --config $CONFIG --dataset $DATASET"
  ip netns exec "$NS_V" "$PY" -m suite train --config "$CONFIG" --dataset "$DATASET" \
    --out "$CHECKPOINT" >"$WORK/vendor/train.log" 2>&1 &
  PIDS+=($!)
  wait "${PIDS[-1]}" || { tail -20 "$WORK/vendor/train.log" >&2; echo "error: training failed" >&2; exit 1; }
fi
LABELS="$("$PY" -c "
import sys
from suite.models import load_checkpoint
print(','.join(p for p in load_checkpoint(sys.argv[1]).pathologies if p))" "$CHECKPOINT")"
log "vendor model $CHECKPOINT, labels $LABELS"

BEFORE_H="$(counters "$NS_H" "$VETH_H")"
BEFORE_V="$(counters "$NS_V" "$VETH_V")"

# ------------------------------------------------------------------ vendor: parties 0 and 2
VENDOR_ENV=(env GLOO_SOCKET_IFNAME="$VETH_V" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1)
ip netns exec "$NS_V" "${VENDOR_ENV[@]}" "$PY" -m backends.mpc.crypten_party dealer \
  --master-addr "$ADDR_V" --master-port "$PORT" >"$WORK/vendor/dealer.log" 2>&1 &
PIDS+=($!); DEALER_PID=$!
ip netns exec "$NS_V" "${VENDOR_ENV[@]}" "$PY" -m backends.mpc.crypten_party model-owner \
  --master-addr "$ADDR_V" --master-port "$PORT" --checkpoint "$CHECKPOINT" --labels "$LABELS" \
  >"$WORK/vendor/model_owner.log" 2>&1 &
PIDS+=($!); OWNER_PID=$!
log "vendor: model owner pid $OWNER_PID, dealer pid $DEALER_PID, rendezvous $ADDR_V:$PORT"

# ------------------------------------------------------------------ hospital: the benchmark
RUN_DIR="$WORK/hospital/run"
log "hospital: suite run (plaintext reference + mpc data owner) -> $RUN_DIR"
ip netns exec "$NS_H" env GLOO_SOCKET_IFNAME="$VETH_H" MPC_MASTER_ADDR="$ADDR_V" MPC_MASTER_PORT="$PORT" \
  timeout "${MPC_NS_TIMEOUT:-900}" "$PY" -m suite run --config "$CONFIG" --model "$CHECKPOINT" \
  --backends plaintext,mpc:local_parties=data_owner --out "$RUN_DIR" --no-report "${QUICK[@]}" \
  >"$WORK/hospital/run.log" 2>&1 &
PIDS+=($!); RUN_PID=$!
RUN_STATUS=0 OWNER_STATUS=running DEALER_STATUS=running
reap() {  # set OWNER_STATUS / DEALER_STATUS once that process has exited
  if [ "$OWNER_STATUS" = running ] && ! kill -0 "$OWNER_PID" 2>/dev/null; then
    OWNER_STATUS=0; wait "$OWNER_PID" || OWNER_STATUS=$?
  fi
  if [ "$DEALER_STATUS" = running ] && ! kill -0 "$DEALER_PID" 2>/dev/null; then
    DEALER_STATUS=0; wait "$DEALER_PID" || DEALER_STATUS=$?
  fi
}
while kill -0 "$RUN_PID" 2>/dev/null; do
  # a vendor party that fails ends the demo now, not when the data owner's rendezvous times out
  reap
  for who in model_owner:"$OWNER_STATUS" dealer:"$DEALER_STATUS"; do
    case "${who#*:}" in
      0|running) ;;
      *) tail -15 "$WORK/vendor/${who%%:*}.log" >&2
         echo "error: the vendor's ${who%%:*} exited (status ${who#*:}) while the benchmark ran; logs in $WORK" >&2
         exit 1 ;;
    esac
  done
  sleep 0.5
done
wait "$RUN_PID" || RUN_STATUS=$?

# the model owner stops when the data owner says so, and stops the dealer
for _ in $(seq 150); do
  reap
  [ "$OWNER_STATUS" != running ] && [ "$DEALER_STATUS" != running ] && break
  sleep 0.2
done
AFTER_H="$(counters "$NS_H" "$VETH_H")"
AFTER_V="$(counters "$NS_V" "$VETH_V")"
if [ "$RUN_STATUS" != 0 ]; then
  tail -25 "$WORK/hospital/run.log" >&2
  for f in model_owner dealer; do echo "--- vendor $f.log" >&2; tail -5 "$WORK/vendor/$f.log" >&2; done
  echo "error: the benchmark run failed (exit $RUN_STATUS); logs in $WORK" >&2
  exit 1
fi
log "vendor exit codes: model owner $OWNER_STATUS, dealer $DEALER_STATUS"

# ------------------------------------------------------------------ figures and checks
"$PY" - "$RUN_DIR" "$WORK" "$BEFORE_H" "$AFTER_H" "$BEFORE_V" "$AFTER_V" "$OWNER_STATUS" "$DEALER_STATUS" <<'EOF'
import json, re, sys
from pathlib import Path

import pandas as pd

run_dir, work = Path(sys.argv[1]), Path(sys.argv[2])
before_h, after_h, before_v, after_v = (list(map(int, a.split())) for a in sys.argv[3:7])
owner_status, dealer_status = sys.argv[7], sys.argv[8]      # exit codes, or "running"
rows = pd.read_json(run_dir / "results.jsonl", lines=True)
mpc = rows[rows.backend == "mpc"]
if mpc.empty:
    sys.exit("error: the run has no mpc rows")


def value(metric, total=False, **where):
    sel = mpc[mpc.metric == metric]
    for k, v in where.items():
        sel = sel[sel[k] == v]
    if total:                      # summed over phases (setup + online)
        return float(sel.value.sum())
    return float(sel.value.iloc[0]) if len(sel) else None


status = sorted(set(mpc.status.dropna()))
d_h = [a - b for a, b in zip(after_h, before_h)]
d_v = [a - b for a, b in zip(after_v, before_v)]
# what the vendor's model owner reported (its own counters, on its stderr)
owner = {"sent": 0, "received": 0}
for m in re.finditer(r"\[model_owner\] \w+: sent (\d+) B, received (\d+) B",
                     (work / "vendor" / "model_owner.log").read_text()):
    owner["sent"] += int(m[1])
    owner["received"] += int(m[2])
s = {
    "backend_id": mpc.backend_id.iloc[0], "status": status,
    "n_images": value("n_images"),
    "max_abs_dp": value("max_abs_diff", label="__all__", site="__all__"),
    "mean_abs_dp": value("mean_abs_diff", label="__all__", site="__all__"),
    "latency_per_image_p50_s": value("latency_per_image_p50"),
    "setup_time_s": value("setup_time"), "wall_time_s": value("wall_time"),
    "bytes_sent": value("bytes_sent"), "bytes_received": value("bytes_received"),    # online
    # everything the data owner sent / received over the MPC channel, setup included
    "data_owner_sent": value("party_bytes_sent", total=True, party="data_owner"),
    "data_owner_received": value("party_bytes_received", total=True, party="data_owner"),
    "bytes_per_image": value("bytes_per_image"), "rounds": value("rounds"),
    "data_owner_cpu_per_image_s": value("party_cpu_time_per_image", party="data_owner"),
    "model_owner_reported": owner,
    "veth_hospital": dict(zip(("rx_bytes", "tx_bytes", "rx_packets", "tx_packets"), d_h)),
    "veth_vendor": dict(zip(("rx_bytes", "tx_bytes", "rx_packets", "tx_packets"), d_v)),
    "vendor_exit": {"model_owner": owner_status, "dealer": dealer_status},
}
checks = {
    "mpc rows ok": status == ["ok"] and s["n_images"],
    "fidelity max |dp| < 1e-3": s["max_abs_dp"] is not None and s["max_abs_dp"] < 1e-3,
    "hospital veth tx >= data owner bytes sent": d_h[1] >= s["data_owner_sent"] > 0,
    "hospital veth rx >= data owner bytes received": d_h[0] >= s["data_owner_received"] > 0,
    "vendor veth saw the same frames": d_v[0] == d_h[1] and d_v[1] == d_h[0],
    "model owner's own counts match the data owner's": (owner["sent"], owner["received"])
                                                       == (s["data_owner_received"], s["data_owner_sent"]),
    "vendor parties exited cleanly": owner_status == "0" and dealer_status == "0",
}
s["checks"] = {k: bool(v) for k, v in checks.items()}
(work / "summary.json").write_text(json.dumps(s, indent=2))
mb = 1e6
print(f"mpc row {s['backend_id']}: {s['n_images']:.0f} images, status {','.join(status)}")
print(f"  fidelity   max |dp| {s['max_abs_dp']:.2e}, mean |dp| {s['mean_abs_dp']:.2e} (vs plaintext)")
print(f"  latency    {s['latency_per_image_p50_s'] * 1e3:.0f} ms/image (p50), setup {s['setup_time_s']:.1f} s, "
      f"data owner CPU {s['data_owner_cpu_per_image_s'] * 1e3:.0f} ms/image")
print(f"  online     data owner sent {s['bytes_sent'] / mb:.3f} MB, received {s['bytes_received'] / mb:.3f} MB, "
      f"{s['rounds']:.0f} rounds ({s['bytes_per_image'] / mb:.3f} MB/image)")
print(f"  reported   with setup: data owner sent {s['data_owner_sent']:.0f} B, received "
      f"{s['data_owner_received']:.0f} B; model owner (vendor log) sent {owner['sent']} B, "
      f"received {owner['received']} B")
print(f"  veth       hospital tx {d_h[1]} B ({d_h[3]} packets), rx {d_h[0]} B ({d_h[2]} packets): "
      f"{d_h[1] / max(s['data_owner_sent'], 1):.3f}x / {d_h[0] / max(s['data_owner_received'], 1):.3f}x "
      f"the reported bytes")
for name, ok in checks.items():
    print(f"  [{'ok' if ok else 'FAILED'}] {name}")
print(f"summary: {work / 'summary.json'}")
sys.exit(0 if all(checks.values()) else 1)
EOF
