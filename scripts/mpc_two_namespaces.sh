#!/usr/bin/env bash
# Two-party secure inference (CrypTen, SecretFlow SPU) across network namespaces on one
# machine, CrypTen's dealer on a host of its own, every party link inside an authenticated,
# encrypted tunnel - or, for the positive control, in the clear.
#
#   sudo scripts/mpc_two_namespaces.sh [--config RUN.toml] [--checkpoint MODEL.pt]
#          [--work DIR] [--port P] [--mtu N] [--port-range LO-HI] [--quick]
#          [--engine crypten|spu[,...]] [--channel tls-vpn|plain[,...]]
#          [--dealer-on third|vendor] [--capture FILE.pcap]
#
# Three namespaces, each with its own lo and one veth end; the other ends sit on a bridge in
# a fourth namespace ("link": the untrusted network between the hosts, where --capture
# listens). No namespace has any other path to another:
#   vendor    10.77.0.2  trains (or is given) the model, then runs the model owner (party 0,
#                        which hosts the rendezvous / listens on the link):
#                        crypten: `python -m backends.mpc.crypten_party model-owner ...`
#                        spu:     `python -m backends.mpc.spu_engine model-owner ...`
#   dealer    10.77.0.3  CrypTen's triple dealer (party 2), run by neither party:
#                        `python -m backends.mpc.crypten_party dealer ...` (SPU has none)
#   hospital  10.77.0.1  runs the benchmark: `python -m suite run --backends
#                        plaintext,mpc:local_parties=data_owner:channel=...`; it starts only
#                        the data owner (party 1); plaintext is there only as the fidelity reference
# --engine and --channel take comma-separated lists: the namespaces (and tunnels) are made
# once and one session runs per channel, each with fresh vendor processes for every engine,
# ONE benchmark run on the hospital with an mpc row per engine, and its own counters,
# capture and summary (so a test gets both channels and both engines from one setup).
# With channel tls-vpn every pair of hosts gets its own OpenVPN tunnel
# (`python -m backends.mpc.tunnel`: per-run CA and Ed25519 certificates from os.urandom, both
# ends verify each other, TLS 1.3, AES-256-GCM), each host has one address inside the
# tunnels (10.78.0.1 / .2 / .3), and the parties use it (gloo binds to it via
# GLOO_SOCKET_IFNAME = a tun device; SPU's brpc listens on it). Channel plain runs the
# parties' TCP directly on the bridge (the insecure setting, for the capture's positive
# control and to measure the tunnel's cost). --dealer-on vendor starts CrypTen's dealer in
# the vendor's namespace instead (no dealer host; the row then says dealer_host=model_owner:
# images protected from the model owner by trust).
# Then it prints each mpc row's fidelity (max |dp| vs plaintext), latency and bytes, and checks
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
#   --work DIR         logs, checkpoint, run folders and summaries (default: a new temp dir);
#                      each session's in DIR/CHANNEL/ (summary.json there), and
#                      DIR/summary.json holds every row's figures keyed "ENGINE-CHANNEL"
#   --port P           CrypTen's rendezvous port on the vendor (default 29517); SPU's
#                      model owner listens on P+2, its data owner on P+3
#   --mtu N            veth MTU (default 1500, as on Ethernet; loopback has 65536)
#   --port-range LO-HI ephemeral port range in the party namespaces (net.ipv4.ip_local_port_range),
#                      which is where gloo's listening sockets are: what a firewall must open
#   --engine E[,E]     crypten (default) and/or spu (SEMI2K; needs .venv-spu/)
#   --channel C[,C]    tls-vpn (default): OpenVPN tunnels between every pair of hosts;
#                      plain: the parties' TCP in the clear (insecure)
#   --dealer-on W      third (default): CrypTen's dealer in its own namespace; vendor:
#                      co-located with the model owner (labelled in the row)
#   --capture FILE     tcpdump on the link bridge during each session (from before the
#                      vendor's parties start to after they exit); with one channel into
#                      FILE, with several into FILE's name plus -CHANNEL (link-plain.pcap)
#   --quick            pass --quick to `suite run`
# Environment: PYTHON (default <repo>/.venv/bin/python), MPC_NS_ID (suffix for the namespace
# and interface names, default this shell's pid), MPC_NS_TIMEOUT (seconds for each benchmark
# run, default 900), MPC_NS_RECORD_DIR (tests only: the parties record what they receive and
# CrypTen's dealer what it sends, in MPC_NS_RECORD_DIR/CHANNEL/, so a capture can be
# searched for them).
# Exit status: 0 all checks passed; 1 a check or a step failed; 2 cannot run here (not root,
# no `ip netns`, no openvpn or /dev/net/tun for tls-vpn, no tcpdump for --capture, no
# .venv-spu/ for spu).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
CONFIG="" CHECKPOINT="" WORK="" PORT=29517 MTU=1500 PORT_RANGE="" QUICK=()
CHANNELS=tls-vpn ENGINES=crypten DEALER_ON=third CAPTURE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --config) CONFIG="$(realpath "$2")"; shift 2 ;;
    --checkpoint) CHECKPOINT="$(realpath "$2")"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --mtu) MTU="$2"; shift 2 ;;
    --port-range) PORT_RANGE="$2"; shift 2 ;;
    --channel) CHANNELS="$2"; shift 2 ;;
    --engine) ENGINES="$2"; shift 2 ;;
    --dealer-on) DEALER_ON="$2"; shift 2 ;;
    --capture) CAPTURE="$(realpath -m "$2")"; shift 2 ;;
    --quick) QUICK=(--quick); shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
IFS=, read -r -a CHANNEL_LIST <<<"$CHANNELS"
IFS=, read -r -a ENGINE_LIST <<<"$ENGINES"
for c in "${CHANNEL_LIST[@]}"; do
  case "$c" in tls-vpn|plain) ;; *) echo "error: --channel takes tls-vpn and/or plain, got '$c'" >&2; exit 2 ;; esac
done
for e in "${ENGINE_LIST[@]}"; do
  case "$e" in crypten|spu) ;; *) echo "error: --engine takes crypten and/or spu, got '$e'" >&2; exit 2 ;; esac
done
[ ${#CHANNEL_LIST[@]} -gt 0 ] && [ ${#ENGINE_LIST[@]} -gt 0 ] || { echo "error: --engine and --channel need a value" >&2; exit 2; }
TUNNELS=false
case ",$CHANNELS," in *,tls-vpn,*) TUNNELS=true ;; esac
case "$DEALER_ON" in third|vendor) ;; *) echo "error: --dealer-on must be third or vendor, got '$DEALER_ON'" >&2; exit 2 ;; esac

if [ "$(id -u)" != 0 ]; then
  echo "error: needs root (creates network namespaces, veth pairs and tunnels); run it with sudo" >&2
  exit 2
fi
if ! command -v ip >/dev/null 2>&1 || ! ip netns list >/dev/null 2>&1; then
  echo "error: 'ip netns' is unavailable (install iproute2; the kernel needs network namespaces)" >&2
  exit 2
fi
if [ "$TUNNELS" = true ]; then
  if ! command -v openvpn >/dev/null 2>&1; then
    echo "error: --channel tls-vpn needs openvpn (Debian: apt-get install openvpn; scripts/setup.sh does)" >&2
    exit 2
  fi
  if [ ! -c /dev/net/tun ]; then
    echo "error: --channel tls-vpn needs /dev/net/tun (the kernel's tun driver)" >&2
    exit 2
  fi
fi
case ",$ENGINES," in
  *,spu,*) "$PY" -c "import sys; sys.path.insert(0, sys.argv[1])
from backends.mpc.spu_engine import spu_available; sys.exit(0 if spu_available() else 1)" "$ROOT" || {
    echo "error: --engine spu needs SPU's own environment .venv-spu/ (bash scripts/setup.sh)" >&2; exit 2; } ;;
esac
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

# ------------------------------------------------------------------ channel: tunnels or plain
TUNNEL_SETUP_S=0
declare -A TUN_IF TPID
if [ "$TUNNELS" = true ]; then
  t0=$(date +%s.%N)
  "$PY" -m backends.mpc.tunnel pki "$WORK/tunnel/pki" "${HOSTS[@]}"
  port_of() { case "$1$2" in hospitalvendor|vendorhospital) echo 1194 ;; hospitaldealer|dealerhospital) echo 1195 ;; *) echo 1196 ;; esac; }
  for host in "${HOSTS[@]}"; do
    peers=()
    for peer in "${HOSTS[@]}"; do
      [ "$peer" = "$host" ] && continue
      peers+=(--peer "$peer=${ADDR[$peer]}=${TUN[$peer]}=$(port_of "$host" "$peer")")
      TUN_IF[$host]="tun${host:0:1}${peer:0:1}$ID"; TUN_IF[$host]="${TUN_IF[$host]:0:15}"
    done
    (cd "$ROOT" && exec ip netns exec "${NS[$host]}" "$PY" -m backends.mpc.tunnel host --pki "$WORK/tunnel/pki" \
      --me "$host" --underlay "${ADDR[$host]}" --overlay "${TUN[$host]}" "${peers[@]}" --suffix "$ID" \
      --log-dir "$WORK/tunnel" --ready-file "$WORK/tunnel/$host.ready" >"$WORK/tunnel/$host.log" 2>&1) &
    PIDS+=($!); TPID[$host]=$!
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
# the labels from the checkpoint's metadata (building the net, as the model owners do, would
# import torchxrayvision and torchvision for nothing here)
LABELS="$("$PY" -c "
import sys
from suite.models import checkpoint_meta
print(','.join(p for p in checkpoint_meta(sys.argv[1])['pathologies'] if p))" "$CHECKPOINT")"
log "vendor model $CHECKPOINT, labels $LABELS"

# ------------------------------------------------------------------ one session per channel
# Each session: the vendor's parties for every engine (CrypTen's model owner and dealer, SPU's
# model owner) started fresh, the link captured, ONE benchmark run on the hospital with an
# mpc row per engine (one after the other), counters read before and after, figures checked.
DEALER_NS="$NS_D" DEALER_HOST=third_party
[ "$DEALER_ON" = vendor ] && DEALER_NS="$NS_V" DEALER_HOST=model_owner
tunnels_alive() {
  [ "$TUNNELS" = true ] || return 0
  for host in "${HOSTS[@]}"; do kill -0 "${TPID[$host]}" 2>/dev/null || return 1; done
}
SESSIONS=()
FAILED=()
SPU_PORT=$((PORT + 2))       # SPU's model owner; its data owner listens on SPU_PORT + 1

session() {  # CHANNEL -> 0 when every check passed
  local channel=$1 SW="$WORK/$1"
  mkdir -p "$SW/vendor" "$SW/hospital" "$SW/dealer"
  local master_v="$ADDR_V" addr_h="$ADDR_H" if_h="${VETH[hospital]}" if_v="${VETH[vendor]}"
  local if_d="${VETH[dealer]}"
  if [ "$channel" = tls-vpn ]; then
    master_v="$TUN_V" addr_h="$TUN_H" if_h="${TUN_IF[hospital]}" if_v="${TUN_IF[vendor]}"
    if_d="${TUN_IF[dealer]:-}"
  fi
  [ "$DEALER_ON" = vendor ] && if_d="$if_v"
  local capture="" cap_log="$SW/capture.log"
  if [ -n "$CAPTURE" ]; then
    capture="$CAPTURE"
    if [ "${#CHANNEL_LIST[@]}" -gt 1 ]; then
      case "$CAPTURE" in *.pcap) capture="${CAPTURE%.pcap}-$channel.pcap" ;; *) capture="$CAPTURE-$channel" ;; esac
    fi
    mkdir -p "$(dirname "$capture")"
    ip netns exec "$NS_L" tcpdump -i "$BRIDGE" -s 0 -B 32768 -U -n -w "$capture" >"$cap_log" 2>&1 &
    CAPTURE_PID=$!
    for _ in $(seq 100); do grep -q "listening on" "$cap_log" && break; sleep 0.1; done
    grep -q "listening on" "$cap_log" || { cat "$cap_log" >&2; echo "error: tcpdump did not start" >&2; return 1; }
    log "[$channel] capturing the link ($BRIDGE) into $capture"
  fi
  local record_env=() record_dir="" dealer_cmd=(-m backends.mpc.crypten_party)
  if [ -n "${MPC_NS_RECORD_DIR:-}" ]; then    # tests only: what the secret material looks like
    record_dir="$MPC_NS_RECORD_DIR/$channel"
    mkdir -p "$record_dir"
    record_env=(MPC_RECORD_DIR="$record_dir")
    dealer_cmd=("$ROOT/tests/mpc_dealer_recording.py" "$record_dir/dealer_sent.pkl")
  fi
  local before_h before_v after_h after_v
  before_h="$(counters "$NS_H" "${VETH[hospital]}")"
  before_v="$(counters "$NS_V" "${VETH[vendor]}")"

  # vendor: party 0 of every engine (and CrypTen's dealer, party 2)
  local specs="" engine
  local -A owner_pid dealer_pid owner_status dealer_status
  for engine in "${ENGINE_LIST[@]}"; do
    owner_status[$engine]=running dealer_status[$engine]=none
    if [ "$engine" = crypten ]; then
      ip netns exec "$DEALER_NS" env GLOO_SOCKET_IFNAME="$if_d" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
        "$PY" "${dealer_cmd[@]}" dealer --master-addr "$master_v" --master-port "$PORT" \
        >"$SW/dealer/dealer.log" 2>&1 &
      PIDS+=($!); dealer_pid[$engine]=$!; dealer_status[$engine]=running
      ip netns exec "$NS_V" env GLOO_SOCKET_IFNAME="$if_v" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
        "$PY" -m backends.mpc.crypten_party model-owner \
        --master-addr "$master_v" --master-port "$PORT" --checkpoint "$CHECKPOINT" --labels "$LABELS" \
        >"$SW/vendor/model_owner-crypten.log" 2>&1 &
      PIDS+=($!); owner_pid[$engine]=$!
      specs+=",mpc:local_parties=data_owner:channel=$channel:dealer_host=$DEALER_HOST"
      log "[$channel] vendor: CrypTen model owner pid ${owner_pid[$engine]}, rendezvous $master_v:$PORT; dealer pid ${dealer_pid[$engine]} in $DEALER_NS"
    else
      ip netns exec "$NS_V" env OMP_NUM_THREADS=1 "${record_env[@]}" \
        "$PY" -m backends.mpc.spu_engine model-owner --listen "$master_v:$SPU_PORT" \
        --data-owner "$addr_h:$((SPU_PORT + 1))" --checkpoint "$CHECKPOINT" --labels "$LABELS" \
        --timeout-s "${MPC_NS_TIMEOUT:-900}" --workdir "$SW/vendor" \
        >"$SW/vendor/model_owner-spu.log" 2>&1 &
      PIDS+=($!); owner_pid[$engine]=$!
      specs+=",mpc:engine=spu:local_parties=data_owner:channel=$channel:master_port=$SPU_PORT"
      specs+=":data_owner_addr=$addr_h:data_owner_port=$((SPU_PORT + 1))"
      log "[$channel] vendor: SPU model owner pid ${owner_pid[$engine]}, link $master_v:$SPU_PORT, data owner at $addr_h:$((SPU_PORT + 1))"
    fi
  done

  # hospital: the benchmark, one mpc row per engine
  local run_dir="$SW/hospital/run"
  log "[$channel] hospital: suite run (plaintext reference$specs) -> $run_dir"
  ip netns exec "$NS_H" env GLOO_SOCKET_IFNAME="$if_h" MPC_MASTER_ADDR="$master_v" \
    MPC_MASTER_PORT="$PORT" "${record_env[@]}" \
    timeout "${MPC_NS_TIMEOUT:-900}" "$PY" -m suite run --config "$CONFIG" --model "$CHECKPOINT" \
    --backends "plaintext$specs" --out "$run_dir" --no-report "${QUICK[@]}" \
    >"$SW/hospital/run.log" 2>&1 &
  PIDS+=($!)
  local run_pid=$! run_status=0
  reap() {  # note the exit status of every vendor process that has ended
    local e
    for e in "${ENGINE_LIST[@]}"; do
      if [ "${owner_status[$e]}" = running ] && ! kill -0 "${owner_pid[$e]}" 2>/dev/null; then
        owner_status[$e]=0; wait "${owner_pid[$e]}" || owner_status[$e]=$?
      fi
      if [ "${dealer_status[$e]}" = running ] && ! kill -0 "${dealer_pid[$e]}" 2>/dev/null; then
        dealer_status[$e]=0; wait "${dealer_pid[$e]}" || dealer_status[$e]=$?
      fi
    done
  }
  vendor_failed() {  # a vendor process that exited non-zero: name it
    local e
    for e in "${ENGINE_LIST[@]}"; do
      case "${owner_status[$e]}" in 0|running) ;; *) tail -15 "$SW/vendor/model_owner-$e.log" >&2
        echo "error: [$channel] the $e model owner exited (status ${owner_status[$e]}) while the benchmark ran; logs in $SW" >&2
        return 0 ;; esac
      case "${dealer_status[$e]}" in 0|running|none) ;; *) tail -15 "$SW/dealer/dealer.log" >&2
        echo "error: [$channel] the dealer exited (status ${dealer_status[$e]}) while the benchmark ran; logs in $SW" >&2
        return 0 ;; esac
    done
    return 1
  }
  while kill -0 "$run_pid" 2>/dev/null; do
    # a vendor party that fails ends the session now, not when the data owner times out
    reap
    if vendor_failed; then kill -TERM "$run_pid" 2>/dev/null; wait "$run_pid" 2>/dev/null; return 1; fi
    tunnels_alive || { tail -5 "$WORK"/tunnel/*.log >&2; echo "error: a tunnel went down during the run" >&2; return 1; }
    sleep 0.5
  done
  wait "$run_pid" || run_status=$?

  # each model owner stops when its data owner says so (CrypTen's stops the dealer)
  local done_all
  for _ in $(seq 150); do
    reap
    done_all=true
    for engine in "${ENGINE_LIST[@]}"; do
      [ "${owner_status[$engine]}" = running ] || [ "${dealer_status[$engine]}" = running ] && done_all=false
    done
    [ "$done_all" = true ] && break
    sleep 0.2
  done
  local tunnels_up=true
  tunnels_alive || tunnels_up=false
  after_h="$(counters "$NS_H" "${VETH[hospital]}")"
  after_v="$(counters "$NS_V" "${VETH[vendor]}")"
  if [ -n "$CAPTURE_PID" ]; then
    kill -INT "$CAPTURE_PID" 2>/dev/null; wait "$CAPTURE_PID" 2>/dev/null || true; CAPTURE_PID=""
    log "[$channel] capture: $(grep -E 'captured|dropped' "$cap_log" | paste -sd',')"
  fi
  if [ "$run_status" != 0 ]; then
    tail -25 "$SW/hospital/run.log" >&2
    for f in "$SW"/vendor/model_owner-*.log "$SW/dealer/dealer.log"; do
      [ -f "$f" ] && { echo "--- $f" >&2; tail -5 "$f" >&2; }
    done
    echo "error: [$channel] the benchmark run failed (exit $run_status); logs in $SW" >&2
    return 1
  fi
  local exits=""
  for engine in "${ENGINE_LIST[@]}"; do
    exits+="${exits:+,}$engine=${owner_status[$engine]}/${dealer_status[$engine]}"
  done
  log "[$channel] exit codes (model owner/dealer): $exits"
  "$PY" "$ROOT/scripts/mpc_ns_summary.py" "$run_dir" "$SW" "$before_h" "$after_h" "$before_v" "$after_v" \
    "$exits" "$channel" "$DEALER_ON" "$TUNNEL_SETUP_S" "$tunnels_up" "$capture"
}

for channel in "${CHANNEL_LIST[@]}"; do
  if session "$channel"; then SESSIONS+=("$channel"); else FAILED+=("$channel"); fi
  if [ -n "$CAPTURE_PID" ]; then        # a session that failed early left its capture running
    kill -INT "$CAPTURE_PID" 2>/dev/null; wait "$CAPTURE_PID" 2>/dev/null || true; CAPTURE_PID=""
  fi
done
"$PY" - "$WORK" "${CHANNEL_LIST[@]}" <<'EOF'
import json, sys
from pathlib import Path

work = Path(sys.argv[1])
runs = {}
for channel in sys.argv[2:]:
    path = work / channel / "summary.json"
    if path.exists():
        runs.update({f"{engine}-{channel}": s for engine, s in json.loads(path.read_text()).items()})
(work / "summary.json").write_text(json.dumps(runs, indent=2))
EOF
[ ${#FAILED[@]} -eq 0 ] || { echo "error: session(s) failed: ${FAILED[*]} (logs in $WORK)" >&2; exit 1; }
log "sessions passed: ${SESSIONS[*]} (engines ${ENGINE_LIST[*]}); summaries in $WORK/summary.json"
