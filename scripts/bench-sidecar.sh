#!/usr/bin/env bash
# Builds the sidecar in release mode and runs the shared mesh-hop benchmark
# (../shared/bench/sidecar-pair.sh) with our pair beside direct, Envoy, HAProxy and nginx.
# Arguments go to the harness (e.g. --quick, --reps 3, --only direct,haproxy,isthmus).
# Our pair speaks HTTP, as the peers are configured to: the client side serves the load's
# HTTP/1.1 and carries requests over one pooled HTTP/2 connection in mTLS (ALPN istio-h2);
# the server side adds x-forwarded-client-cert. ISTHMUS_PROTOCOL=tcp forwards bytes instead,
# one mTLS connection per client connection, as Istio does for a TCP port.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HARNESS="$ROOT/../shared/bench/sidecar-pair.sh"
[ -x "$HARNESS" ] || { echo "bench-sidecar: $HARNESS not found" >&2; exit 1; }
PROTOCOL="${ISTHMUS_PROTOCOL:-http}"
cargo build --release --locked -p sidecar --manifest-path "$ROOT/Cargo.toml"
BIN="$ROOT/target/release/sidecar"
exec "$HARNESS" "$@" --pair isthmus \
  "$BIN run --outbound {listen}={upstream} --sni {sni} --peer-id {spiffe_peer} --cert {cert} --key {key} --ca {ca} --protocol $PROTOCOL" \
  "$BIN run --inbound {listen}={upstream} --mtls STRICT --cert {cert} --key {key} --ca {ca} --protocol $PROTOCOL"
