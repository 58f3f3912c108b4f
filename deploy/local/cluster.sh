#!/usr/bin/env bash
# A real multi-process barrage cluster on this machine: etcd, 2 controllers,
# 2 push-managers and 3 connect-nodes, each its own process on loopback.
#
#   deploy/local/cluster.sh start    # build if needed, start, print endpoints
#   deploy/local/cluster.sh status   # which processes are up
#   deploy/local/cluster.sh stop     # SIGTERM everything (graceful drain), wait
#
# Settings (environment):
#   BASE_PORT    first of the ports used (default 21000; 80 ports above it)
#   CLUSTER_DIR  state directory: pids, logs, etcd data (default .local-cluster)
#   BARRAGE_BIN  the barrage binary (default: target/debug/barrage, built if missing)
#   ETCD_BIN     the etcd binary (default: etcd on PATH, else /usr/bin/etcd)
set -euo pipefail
cd "$(dirname "$0")/../.."

BASE=${BASE_PORT:-21000}
DIR=${CLUSTER_DIR:-.local-cluster}
BIN=${BARRAGE_BIN:-target/debug/barrage}
ETCD=${ETCD_BIN:-$(command -v etcd || echo /usr/bin/etcd)}

etcd_client=$((BASE)); etcd_peer=$((BASE + 1))
ENDPOINT="http://127.0.0.1:$etcd_client"

wait_ready() { # name url
  local name=$1 url=$2
  for _ in $(seq 1 200); do
    if python3 - "$url" <<'PY' 2>/dev/null; then return 0; fi
import sys, urllib.request
sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=1).status == 200 else 1)
PY
    sleep 0.1
  done
  echo "cluster: $name did not become ready at $url; see $DIR/logs/$name.log" >&2
  return 1
}

launch() { # name args...
  local name=$1; shift
  "$@" >"$DIR/logs/$name.log" 2>&1 </dev/null &
  echo "$! $name" >>"$DIR/pids"
}

start() {
  if [ -s "$DIR/pids" ]; then
    echo "cluster: already running (state in $DIR); run '$0 stop' first" >&2
    exit 1
  fi
  [ -x "$ETCD" ] || { echo "cluster: etcd not found; apt-get install etcd-server" >&2; exit 1; }
  if [ ! -x "$BIN" ]; then cargo build --bin barrage; fi
  mkdir -p "$DIR/logs" "$DIR/etcd"
  : >"$DIR/pids"
  launch etcd "$ETCD" --name local --data-dir "$DIR/etcd" \
    --listen-client-urls "$ENDPOINT" --advertise-client-urls "$ENDPOINT" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "local=http://127.0.0.1:$etcd_peer"
  wait_ready etcd "$ENDPOINT/health"

  export ETCD_ENDPOINTS=$ENDPOINT BIND_ADDR=127.0.0.1 RUST_LOG=${RUST_LOG:-info}
  for i in 1 2; do
    launch "controller-$i" "$BIN" controller --node-id "controller-$i" \
      --grpc-port $((BASE + 9 + i)) --metrics-port $((BASE + 19 + i))
  done
  for i in 1 2; do wait_ready "controller-$i" "http://127.0.0.1:$((BASE + 19 + i))/readyz"; done
  for i in 1 2 3; do
    launch "connect-node-$i" "$BIN" connect-node --node-id "connect-node-$i" --insecure-user-id \
      --ws-port $((BASE + 49 + i)) --grpc-port $((BASE + 59 + i)) --metrics-port $((BASE + 69 + i))
  done
  for i in 1 2; do
    launch "push-manager-$i" "$BIN" push-manager --manager-id "push-manager-$i" \
      --grpc-port $((BASE + 29 + i)) --metrics-port $((BASE + 39 + i))
  done
  for i in 1 2 3; do wait_ready "connect-node-$i" "http://127.0.0.1:$((BASE + 69 + i))/readyz"; done
  for i in 1 2; do wait_ready "push-manager-$i" "http://127.0.0.1:$((BASE + 39 + i))/readyz"; done

  echo "barrage cluster running (state and logs in $DIR)"
  echo "  etcd:          $ENDPOINT"
  for i in 1 2; do echo "  controller-$i:  grpc 127.0.0.1:$((BASE + 9 + i))  metrics http://127.0.0.1:$((BASE + 19 + i))/metrics"; done
  for i in 1 2; do echo "  push-manager-$i: grpc 127.0.0.1:$((BASE + 29 + i))  metrics http://127.0.0.1:$((BASE + 39 + i))/metrics"; done
  for i in 1 2 3; do echo "  connect-node-$i: ws://127.0.0.1:$((BASE + 49 + i))/ws  grpc 127.0.0.1:$((BASE + 59 + i))  metrics http://127.0.0.1:$((BASE + 69 + i))/metrics"; done
  echo "try: grpcurl -plaintext -d '{\"room_id\":\"r1\",\"content\":\"hi\"}' 127.0.0.1:$((BASE + 30)) barrage.v1.PushManager/PushToRoom"
}

status() {
  [ -s "$DIR/pids" ] || { echo "cluster: not running"; return 0; }
  while read -r pid name; do
    if kill -0 "$pid" 2>/dev/null; then echo "up    $name (pid $pid)"; else echo "down  $name (pid $pid)"; fi
  done <"$DIR/pids"
}

stop() {
  [ -s "$DIR/pids" ] || { echo "cluster: not running"; return 0; }
  # Reverse start order: connect-nodes drain before controllers and etcd go.
  tac "$DIR/pids" | while read -r pid name; do
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  rm -f "$DIR/pids"
  rm -rf "$DIR/etcd"
  echo "cluster stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|status|stop" >&2; exit 64 ;;
esac
