#!/usr/bin/env bash
# Two-party CrypTen secure inference across network namespaces on one machine, the dealer on
# a host of its own, every party link inside an authenticated, encrypted tunnel.
#
#   sudo scripts/mpc_two_namespaces.sh [--config RUN.toml] [--checkpoint MODEL.pt]
#          [--work DIR] [--port P] [--mtu N] [--port-range LO-HI] [--quick]
#          [--channel tls-vpn|plain] [--dealer-on third|vendor] [--capture FILE.pcap]
#
# Three namespaces, each with its own lo and one veth end; the other ends sit on a bridge in
# a fourth namespace ("link": the untrusted network between the hosts, where --capture
# listens). No namespace has any other path to another:
#   vendor    10.77.0.2  trains (or is given) the model, then runs the model owner (party 0,
#                        which hosts the rendezvous):
#                        `python -m backends.mpc.crypten_party model-owner ...`
#   dealer    10.77.0.3  the triple dealer (party 2), run by neither party:
#                        `python -m backends.mpc.crypten_party dealer ...`
#   hospital  10.77.0.1  runs the benchmark: `python -m suite run --backends
#                        plaintext,mpc:local_parties=data_owner:channel=...`; it starts only
#                        the data owner (party 1); plaintext is there only as the fidelity reference
# With --channel tls-vpn (default) every pair of hosts gets its own OpenVPN tunnel
# (`python -m backends.mpc.tunnel`: per-run CA and Ed25519 certificates from os.urandom, both
# ends verify each other, TLS 1.3, AES-256-GCM), each host has one address inside the
# tunnels (10.78.0.1 / .2 / .3), and gloo binds to it (GLOO_SOCKET_IFNAME = a tun device).
# --channel plain runs gloo directly on the bridge (the insecure setting, for the capture's
# positive control and to measure the tunnel's cost). --dealer-on vendor starts the dealer in
# the vendor's namespace instead (no dealer host; the row then says dealer_host=model_owner:
# images protected from the model owner by trust).
# Then it prints the mpc row's fidelity (max |dp| vs plaintext), latency and bytes, and checks
# that the hospital's veth counters moved at least the bytes the data owner reported.
# Everything it starts is killed and every namespace (with the veths and bridge) is deleted
# on any exit, failure or Ctrl-C included.
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
#   --port-range LO-HI ephemeral port range in the party namespaces (net.ipv4.ip_local_port_range),
#                      which is where gloo's listening sockets are: what a firewall must open
#   --channel C        tls-vpn (default): OpenVPN tunnels between every pair of hosts;
#                      plain: gloo's TCP in the clear (insecure)
#   --dealer-on W      third (default): the dealer in its own namespace; vendor: co-located
#                      with the model owner (labelled in the row)
#   --capture FILE     tcpdump on the link bridge into FILE (pcap), for the whole session
#   --quick            pass --quick to `suite run`
# Environment: PYTHON (default <repo>/.venv/bin/python), MPC_NS_ID (suffix for the namespace
# and interface names, default this shell's pid), MPC_NS_TIMEOUT (seconds for the whole
# benchmark run, default 900), MPC_NS_RECORD_DIR (tests only: the data owner records what it
# receives and the dealer what it sends, so a capture can be searched for them).
# Exit status: 0 all checks passed; 1 a check or a step failed; 2 cannot run here (not root,
# no `ip netns`, no openvpn or /dev/net/tun for tls-vpn, no tcpdump for --capture).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
CONFIG="" CHECKPOINT="" WORK="" PORT=29517 MTU=1500 PORT_RANGE="" QUICK=()
CHANNEL=tls-vpn DEALER_ON=third CAPTURE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --config) CONFIG="$(realpath "$2")"; shift 2 ;;
    --checkpoint) CHECKPOINT="$(realpath "$2")"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --mtu) MTU="$2"; shift 2 ;;
    --port-range) PORT_RANGE="$2"; shift 2 ;;
    --channel) CHANNEL="$2"; shift 2 ;;
    --dealer-on) DEALER_ON="$2"; shift 2 ;;
    --capture) CAPTURE="$(realpath -m "$2")"; shift 2 ;;
    --quick) QUICK=(--quick); shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$CHANNEL" in tls-vpn|plain) ;; *) echo "error: --channel must be tls-vpn or plain, got '$CHANNEL'" >&2; exit 2 ;; esac
case "$DEALER_ON" in third|vendor) ;; *) echo "error: --dealer-on must be third or vendor, got '$DEALER_ON'" >&2; exit 2 ;; esac

if [ "$(id -u)" != 0 ]; then
  echo "error: needs root (creates network namespaces, veth pairs and tunnels); run it with sudo" >&2
  exit 2
fi
if ! command -v ip >/dev/null 2>&1 || ! ip netns list >/dev/null 2>&1; then
  echo "error: 'ip netns' is unavailable (install iproute2; the kernel needs network namespaces)" >&2
  exit 2
fi
if [ "$CHANNEL" = tls-vpn ]; then
  if ! command -v openvpn >/dev/null 2>&1; then
    echo "error: --channel tls-vpn needs openvpn (Debian: apt-get install openvpn; scripts/setup.sh does)" >&2
    exit 2
  fi
  if [ ! -c /dev/net/tun ]; then
    echo "error: --channel tls-vpn needs /dev/net/tun (the kernel's tun driver)" >&2
    exit 2
  fi
fi
if [ -n "$CAPTURE" ] && ! command -v tcpdump >/dev/null 2>&1; then
  echo "error: --capture needs tcpdump (Debian: apt-get install tcpdump; scripts/setup.sh does)" >&2
  exit 2
fi

ID="${MPC_NS_ID:-$$}"
NS_H="cxr-hospital-$ID" NS_V="cxr-vendor-$ID" NS_D="cxr-dealer-$ID" NS_L="cxr-link-$ID"
BRIDGE="cxrbr$ID"; BRIDGE="${BRIDGE:0:15}"
ADDR_H=10.77.0.1 ADDR_V=10.77.0.2 ADDR_D=10.77.0.3          # on the link (untrusted)
TUN_H=10.78.0.1 TUN_V=10.78.0.2 TUN_D=10.78.0.3             # inside the tunnels
HOSTS=(hospital vendor)
[ "$DEALER_ON" = third ] && HOSTS+=(dealer)
declare -A NS=([hospital]="$NS_H" [vendor]="$NS_V" [dealer]="$NS_D")
declare -A ADDR=([hospital]="$ADDR_H" [vendor]="$ADDR_V" [dealer]="$ADDR_D")
declare -A TUN=([hospital]="$TUN_H" [vendor]="$TUN_V" [dealer]="$TUN_D")
declare -A VETH LVETH
for host in hospital vendor dealer; do
  v="cxr${host:0:1}$ID" l="cxrl${host:0:1}$ID"
  VETH[$host]="${v:0:15}" LVETH[$host]="${l:0:15}"
done
WORK="${WORK:-$(mktemp -d /tmp/mpc-netns.XXXXXX)}"
mkdir -p "$WORK/vendor" "$WORK/hospital" "$WORK/dealer" "$WORK/tunnel"
WORK="$(realpath "$WORK")"
PIDS=()
MADE=()           # what this run created: "ns NAME" / "link NAME"; cleanup removes only these
CAPTURE_PID=""

log() { echo "[netns] $*" >&2; }

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  set +eu
  [ -n "$CAPTURE_PID" ] && kill -INT "$CAPTURE_PID" 2>/dev/null && wait "$CAPTURE_PID" 2>/dev/null
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
      # deleting a namespace deletes the veth ends, tun devices and bridge inside it
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
for ns in "$NS_H" "$NS_V" "$NS_D" "$NS_L"; do
  if ip netns list | grep -qw "$ns"; then
    echo "error: namespace $ns already exists (set MPC_NS_ID to another value)" >&2
    exit 1
  fi
done
for host in hospital vendor dealer; do
  if ip link show "${VETH[$host]}" >/dev/null 2>&1 || ip link show "${LVETH[$host]}" >/dev/null 2>&1; then
    echo "error: interface ${VETH[$host]} or ${LVETH[$host]} already exists (set MPC_NS_ID to another value)" >&2
    exit 1
  fi
done
ip netns add "$NS_L"; MADE+=("ns $NS_L")
ip -n "$NS_L" link add "$BRIDGE" type bridge
ip -n "$NS_L" link set "$BRIDGE" mtu "$MTU" up
ip -n "$NS_L" link set lo up
for host in "${HOSTS[@]}"; do
  ns="${NS[$host]}" v="${VETH[$host]}" l="${LVETH[$host]}"
  ip netns add "$ns"; MADE+=("ns $ns")
  ip link add "$v" type veth peer name "$l"; MADE+=("link $v")
  ip link set "$v" netns "$ns"
  ip link set "$l" netns "$NS_L"
  ip -n "$NS_L" link set "$l" master "$BRIDGE" mtu "$MTU" up
  ip -n "$ns" addr add "${ADDR[$host]}/24" dev "$v"
  ip -n "$ns" link set lo up
  ip -n "$ns" link set "$v" mtu "$MTU" up
  if [ -n "$PORT_RANGE" ]; then          # per namespace, like on separate hosts
    ip netns exec "$ns" sysctl -q -w net.ipv4.ip_local_port_range="${PORT_RANGE/-/ }"
  fi
  log "$host $ns: $(ip -n "$ns" -brief addr show | tr -s ' ' | paste -sd';')"
done
[ -n "$PORT_RANGE" ] && log "ephemeral ports (gloo's listeners) limited to $PORT_RANGE in every party namespace"
log "link $NS_L: bridge $BRIDGE joins ${HOSTS[*]}"

# the link is up: the hospital reaches the vendor only across the bridge
for _ in $(seq 50); do
  ip netns exec "$NS_H" "$PY" -c "import socket; socket.create_connection(('$ADDR_V', 9), 0.2)" \
    2>&1 | grep -q "refused" && break
  sleep 0.1
done

counters() {  # NS DEV -> "rx_bytes tx_bytes rx_packets tx_packets"
  ip netns exec "$1" sh -c "cd /sys/class/net/$2/statistics && cat rx_bytes tx_bytes rx_packets tx_packets" | paste -sd' '
}

if [ -n "$CAPTURE" ]; then           # everything on the link, tunnel handshakes included
  mkdir -p "$(dirname "$CAPTURE")"
  ip netns exec "$NS_L" tcpdump -i "$BRIDGE" -s 0 -B 32768 -U -n -w "$CAPTURE" >"$WORK/capture.log" 2>&1 &
  CAPTURE_PID=$!
  for _ in $(seq 100); do grep -q "listening on" "$WORK/capture.log" && break; sleep 0.1; done
  grep -q "listening on" "$WORK/capture.log" || { cat "$WORK/capture.log" >&2; echo "error: tcpdump did not start" >&2; exit 1; }
  log "capturing the link ($BRIDGE) into $CAPTURE"
fi

# ------------------------------------------------------------------ channel: tunnels or plain
TUNNEL_SETUP_S=0
declare -A IFNAME MASTER
if [ "$CHANNEL" = tls-vpn ]; then
  t0=$(date +%s.%N)
  "$PY" -m backends.mpc.tunnel pki "$WORK/tunnel/pki" "${HOSTS[@]}"
  declare -A TPID
  port_of() { case "$1$2" in hospitalvendor|vendorhospital) echo 1194 ;; hospitaldealer|dealerhospital) echo 1195 ;; *) echo 1196 ;; esac; }
  for host in "${HOSTS[@]}"; do
    peers=()
    for peer in "${HOSTS[@]}"; do
      [ "$peer" = "$host" ] && continue
      peers+=(--peer "$peer=${ADDR[$peer]}=${TUN[$peer]}=$(port_of "$host" "$peer")")
      IFNAME[$host]="tun${host:0:1}${peer:0:1}$ID"; IFNAME[$host]="${IFNAME[$host]:0:15}"
    done
    (cd "$ROOT" && exec ip netns exec "${NS[$host]}" "$PY" -m backends.mpc.tunnel host --pki "$WORK/tunnel/pki" \
      --me "$host" --underlay "${ADDR[$host]}" --overlay "${TUN[$host]}" "${peers[@]}" --suffix "$ID" \
      --log-dir "$WORK/tunnel" --ready-file "$WORK/tunnel/$host.ready" >"$WORK/tunnel/$host.log" 2>&1) &
    PIDS+=($!); TPID[$host]=$!
    MASTER[$host]="$TUN_V"
  done
  for _ in $(seq 600); do
    up=0
    for host in "${HOSTS[@]}"; do
      [ -s "$WORK/tunnel/$host.ready" ] && up=$((up + 1))
      kill -0 "${TPID[$host]}" 2>/dev/null || { cat "$WORK/tunnel/$host.log" >&2; echo "error: the $host's tunnels failed" >&2; exit 1; }
    done
    [ "$up" = "${#HOSTS[@]}" ] && break
    sleep 0.1
  done
  [ "$up" = "${#HOSTS[@]}" ] || { tail -5 "$WORK"/tunnel/*.log >&2; echo "error: the tunnels did not come up within 60 s" >&2; exit 1; }
  TUNNEL_SETUP_S=$("$PY" -c "print(round($(date +%s.%N) - $t0, 3))")
  log "tunnels up in ${TUNNEL_SETUP_S} s (certificates made and every pair's handshake done): $(cat "$WORK"/tunnel/*.log | grep -o 'up in .*' | paste -sd';')"
  log "route hospital -> vendor: $(ip -n "$NS_H" route get "$TUN_V" | head -1 | tr -s ' ')"
else
  for host in "${HOSTS[@]}"; do IFNAME[$host]="${VETH[$host]}"; MASTER[$host]="$ADDR_V"; done
  log "channel: PLAIN TCP on the link (insecure)"
fi
log "route hospital -> vendor (link): $(ip -n "$NS_H" route get "$ADDR_V" | head -1 | tr -s ' ')"

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

BEFORE_H="$(counters "$NS_H" "${VETH[hospital]}")"
BEFORE_V="$(counters "$NS_V" "${VETH[vendor]}")"

# ------------------------------------------------------------------ vendor: party 0; the dealer: party 2
RECORD_ENV=() DEALER_CMD=(-m backends.mpc.crypten_party)
if [ -n "${MPC_NS_RECORD_DIR:-}" ]; then    # tests only: what the secret material looks like
  mkdir -p "$MPC_NS_RECORD_DIR"
  RECORD_ENV=(MPC_RECORD_DIR="$MPC_NS_RECORD_DIR")
  DEALER_CMD=("$ROOT/tests/mpc_dealer_recording.py" "$MPC_NS_RECORD_DIR/dealer_sent.pkl")
fi
DEALER_NS="$NS_D" DEALER_HOST=third_party
[ "$DEALER_ON" = vendor ] && DEALER_NS="$NS_V" DEALER_HOST=model_owner
DEALER_IF="${IFNAME[dealer]:-${IFNAME[vendor]}}"
ip netns exec "$DEALER_NS" env GLOO_SOCKET_IFNAME="$DEALER_IF" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
  "$PY" "${DEALER_CMD[@]}" dealer --master-addr "${MASTER[vendor]}" --master-port "$PORT" \
  >"$WORK/dealer/dealer.log" 2>&1 &
PIDS+=($!); DEALER_PID=$!
ip netns exec "$NS_V" env GLOO_SOCKET_IFNAME="${IFNAME[vendor]}" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
  "$PY" -m backends.mpc.crypten_party model-owner \
  --master-addr "${MASTER[vendor]}" --master-port "$PORT" --checkpoint "$CHECKPOINT" --labels "$LABELS" \
  >"$WORK/vendor/model_owner.log" 2>&1 &
PIDS+=($!); OWNER_PID=$!
log "vendor: model owner pid $OWNER_PID, rendezvous ${MASTER[vendor]}:$PORT; dealer pid $DEALER_PID in $DEALER_NS"

# ------------------------------------------------------------------ hospital: the benchmark
RUN_DIR="$WORK/hospital/run"
MPC_SPEC="mpc:local_parties=data_owner:channel=$CHANNEL:dealer_host=$DEALER_HOST"
log "hospital: suite run (plaintext reference + $MPC_SPEC) -> $RUN_DIR"
ip netns exec "$NS_H" env GLOO_SOCKET_IFNAME="${IFNAME[hospital]}" MPC_MASTER_ADDR="${MASTER[hospital]}" \
  MPC_MASTER_PORT="$PORT" "${RECORD_ENV[@]}" \
  timeout "${MPC_NS_TIMEOUT:-900}" "$PY" -m suite run --config "$CONFIG" --model "$CHECKPOINT" \
  --backends "plaintext,$MPC_SPEC" --out "$RUN_DIR" --no-report "${QUICK[@]}" \
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
tunnels_alive() {
  [ "$CHANNEL" = tls-vpn ] || return 0
  for host in "${HOSTS[@]}"; do kill -0 "${TPID[$host]}" 2>/dev/null || return 1; done
}
while kill -0 "$RUN_PID" 2>/dev/null; do
  # a vendor party that fails ends the demo now, not when the data owner's rendezvous times out
  reap
  for who in vendor/model_owner:"$OWNER_STATUS" dealer/dealer:"$DEALER_STATUS"; do
    case "${who#*:}" in
      0|running) ;;
      *) tail -15 "$WORK/${who%%:*}.log" >&2
         echo "error: the ${who%%:*} process exited (status ${who#*:}) while the benchmark ran; logs in $WORK" >&2
         exit 1 ;;
    esac
  done
  tunnels_alive || { tail -5 "$WORK"/tunnel/*.log >&2; echo "error: a tunnel went down during the run" >&2; exit 1; }
  sleep 0.5
done
wait "$RUN_PID" || RUN_STATUS=$?

# the model owner stops when the data owner says so, and stops the dealer
for _ in $(seq 150); do
  reap
  [ "$OWNER_STATUS" != running ] && [ "$DEALER_STATUS" != running ] && break
  sleep 0.2
done
TUNNELS_UP_AT_END=true
tunnels_alive || TUNNELS_UP_AT_END=false
AFTER_H="$(counters "$NS_H" "${VETH[hospital]}")"
AFTER_V="$(counters "$NS_V" "${VETH[vendor]}")"
if [ -n "$CAPTURE_PID" ]; then
  kill -INT "$CAPTURE_PID" 2>/dev/null; wait "$CAPTURE_PID" 2>/dev/null || true; CAPTURE_PID=""
  log "capture: $(grep -E 'captured|dropped' "$WORK/capture.log" | paste -sd',')"
fi
if [ "$RUN_STATUS" != 0 ]; then
  tail -25 "$WORK/hospital/run.log" >&2
  for f in vendor/model_owner dealer/dealer; do echo "--- $f.log" >&2; tail -5 "$WORK/$f.log" >&2; done
  echo "error: the benchmark run failed (exit $RUN_STATUS); logs in $WORK" >&2
  exit 1
fi
log "exit codes: model owner $OWNER_STATUS, dealer $DEALER_STATUS"

# ------------------------------------------------------------------ figures and checks
"$PY" - "$RUN_DIR" "$WORK" "$BEFORE_H" "$AFTER_H" "$BEFORE_V" "$AFTER_V" "$OWNER_STATUS" "$DEALER_STATUS" \
  "$CHANNEL" "$DEALER_ON" "$TUNNEL_SETUP_S" "$TUNNELS_UP_AT_END" "$CAPTURE" <<'EOF'
import json, re, sys
from pathlib import Path

import pandas as pd

run_dir, work = Path(sys.argv[1]), Path(sys.argv[2])
before_h, after_h, before_v, after_v = (list(map(int, a.split())) for a in sys.argv[3:7])
owner_status, dealer_status = sys.argv[7], sys.argv[8]      # exit codes, or "running"
channel, dealer_on, tunnel_setup_s, tunnels_up, capture = sys.argv[9:14]
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
    "channel": channel, "dealer_on": dealer_on,
    "tunnel_setup_s": float(tunnel_setup_s) if channel == "tls-vpn" else None,
    "tunnels_up_at_end": tunnels_up == "true" if channel == "tls-vpn" else None,
    "row_channel_encrypted": value("channel_encrypted"),
    "row_channel_note": (mpc[mpc.metric == "channel_encrypted"].note.iloc[0]
                         if (mpc.metric == "channel_encrypted").any() else None),
    "row_trust_assumptions": list(mpc.tm_trust_assumptions.iloc[0]),
    "capture": capture or None,
}
if capture:
    text = (work / "capture.log").read_text()
    m, d = re.search(r"(\d+) packets captured", text), re.search(r"(\d+) packets dropped by kernel", text)
    s["capture_packets"], s["capture_dropped"] = int(m[1]) if m else None, int(d[1]) if d else None

checks = {
    "mpc rows ok": status == ["ok"] and s["n_images"],
    "fidelity max |dp| < 1e-3": s["max_abs_dp"] is not None and s["max_abs_dp"] < 1e-3,
    "hospital veth tx >= data owner bytes sent": d_h[1] >= s["data_owner_sent"] > 0,
    "hospital veth rx >= data owner bytes received": d_h[0] >= s["data_owner_received"] > 0,
    "the row says which channel it had": s["row_channel_encrypted"] == (1.0 if channel == "tls-vpn" else 0.0),
    "model owner's own counts match the data owner's": (owner["sent"], owner["received"])
                                                       == (s["data_owner_received"], s["data_owner_sent"]),
    "vendor parties exited cleanly": owner_status == "0" and dealer_status == "0",
}
if channel == "tls-vpn":
    checks["tunnels stayed up to the end"] = s["tunnels_up_at_end"]
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
if channel == "tls-vpn":
    print(f"  channel    OpenVPN tunnels between every pair of hosts, up in {s['tunnel_setup_s']:.2f} s")
else:
    print("  channel    PLAIN TCP on the link (insecure)")
if capture:
    print(f"  capture    {capture}: {s['capture_packets']} packets, {s['capture_dropped']} dropped by the kernel")
print(f"  veth       hospital tx {d_h[1]} B ({d_h[3]} packets), rx {d_h[0]} B ({d_h[2]} packets): "
      f"{d_h[1] / max(s['data_owner_sent'], 1):.3f}x / {d_h[0] / max(s['data_owner_received'], 1):.3f}x "
      f"the reported bytes")
for name, ok in checks.items():
    print(f"  [{'ok' if ok else 'FAILED'}] {name}")
print(f"summary: {work / 'summary.json'}")
sys.exit(0 if all(checks.values()) else 1)
EOF
