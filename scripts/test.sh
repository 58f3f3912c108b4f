#!/usr/bin/env bash
# Installs what the tests need, then runs every test of barrage:
#   - etcd (Debian's etcd-server), Prometheus (promtool and a real
#     server, for the alert-rule and scrape tests), openssl (test
#     certificates for the TLS tests) and nginx-light + libnginx-mod-nchan
#     (the side-by-side bench smoke test) when missing,
#   - a Python venv at .venv with the tools the black-box tests use
#     (grpcio + reflection, websockets, a real grpcurl binary),
#   - `cargo test --workspace` (unit, contract and end-to-end tests, many of
#     them against a real etcd started on a free loopback port),
#   - `pytest tests/python` (the built binary driven as a user would: the
#     README's grpcurl lines, reflection-only gRPC, multi-process clusters),
#   - the JavaScript client's tests (`npm test` in clients/js: unit tests
#     and the demo page driven in headless Chromium, Debian's `chromium`).
# Works unattended (CI=true, no stdin). Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v etcd >/dev/null 2>&1 || [ -x /usr/bin/etcd ] || missing+=(etcd-server)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v ss >/dev/null 2>&1 || missing+=(iproute2)
[ -n "${CHROMIUM:-}" ] || command -v chromium >/dev/null 2>&1 || missing+=(chromium)
[ -x /usr/sbin/nginx ] || missing+=(nginx-light)
[ -e /usr/lib/nginx/modules/ngx_nchan_module.so ] || missing+=(libnginx-mod-nchan)
if [ ${#missing[@]} -gt 0 ]; then
  step "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq
  as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v etcd >/dev/null 2>&1 || export ETCD_BIN=/usr/bin/etcd

step "python test tools in .venv"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -r tests/python/requirements.txt

step "cargo test --workspace"
cargo test --workspace --all-targets </dev/null

step "pytest tests/python"
cargo build --bin barrage </dev/null
PATH="$PWD/.venv/bin:$PATH" .venv/bin/python -m pytest -q -s tests/python </dev/null

step "JavaScript client: unit tests and the demo page in headless Chromium"
(cd clients/js && npm ci --no-audit --no-fund --loglevel=error </dev/null && PATH="$PWD/../../.venv/bin:$PATH" npm test </dev/null)

step "all tests passed"
