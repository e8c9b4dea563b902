#!/usr/bin/env bash
# Builds the sidecar in release mode and runs the shared mesh-hop benchmark
# (../shared/bench/sidecar-pair.sh) with our pair beside direct, Envoy, HAProxy and nginx.
# Arguments go to the harness (e.g. --quick, --reps 3, --only direct,haproxy,isthmus).
# ISTHMUS_PROTOCOL=http makes our pair speak HTTP/1.1 (inbound adds x-forwarded-client-cert);
# the default, tcp, forwards the bytes as Istio does for a TCP port.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HARNESS="$ROOT/../shared/bench/sidecar-pair.sh"
[ -x "$HARNESS" ] || { echo "bench-sidecar: $HARNESS not found" >&2; exit 1; }
PROTOCOL="${ISTHMUS_PROTOCOL:-tcp}"
cargo build --release --locked -p sidecar --manifest-path "$ROOT/Cargo.toml"
BIN="$ROOT/target/release/sidecar"
exec "$HARNESS" "$@" --pair isthmus \
  "$BIN run --outbound {listen}={upstream} --sni {sni} --peer-id {spiffe_peer} --cert {cert} --key {key} --ca {ca} --protocol $PROTOCOL" \
  "$BIN run --inbound {listen}={upstream} --mtls STRICT --cert {cert} --key {key} --ca {ca} --protocol $PROTOCOL"
