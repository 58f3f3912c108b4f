#!/usr/bin/env bash
# barrage and Nchan side by side: the same room fan-out (same subscriber
# client, same payloads, same rates) against `barrage dev` and against
# nginx + Nchan configured from bench/nchan/nginx.conf, in one run, with
# barrage/Nchan ratios at the end. Loopback only, bounded in time.
#
# Usage: bench/nchan/run.sh [barrage bench flags...]
#   e.g. bench/nchan/run.sh --subscribers 10000 --rate 20 --duration-secs 10
set -euo pipefail
cd "$(dirname "$0")/../.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
if [ ! -x /usr/sbin/nginx ] || [ ! -e /usr/lib/nginx/modules/ngx_nchan_module.so ]; then
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq
  as_root apt-get install -y -qq --no-install-recommends nginx-light libnginx-mod-nchan >/dev/null
fi
cargo build --release --bin barrage </dev/null
exec target/release/barrage bench --compare nchan "$@"
