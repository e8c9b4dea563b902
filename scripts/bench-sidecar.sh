#!/usr/bin/env bash
# Builds the sidecar as it ships (scripts/build-sidecar.sh) and runs the shared mesh-hop benchmark
# (../shared/bench/sidecar-pair.sh) with our pair beside direct, Envoy, HAProxy and nginx.
# Arguments go to the harness (e.g. --quick, --reps 3, --only direct,haproxy,isthmus).
# Our pair speaks HTTP, as the peers are configured to: the client side serves the load's
# HTTP/1.1 and carries requests over one pooled HTTP/2 connection in mTLS (ALPN istio-h2);
# ISTHMUS_H2_UPGRADE=off keeps them HTTP/1.1 (ALPN istio-http/1.1, a kept-alive connection
# per request in flight, Istio's default). The server side adds x-forwarded-client-cert. ISTHMUS_PROTOCOL=tcp forwards bytes instead,
# one mTLS connection per client connection, as Istio does for a TCP port.
#
# --mesh ROUTES:ENDPOINTS (ours, not passed on) benchmarks with routing, authorization and
# telemetry on: both sides run with --synthetic-mesh ROUTES:ENDPOINTS (the client side routes
# every request through ROUTES virtual hosts and clusters holding ENDPOINTS endpoints, the
# server side checks it against an ALLOW policy of ROUTES rules) and write an access log
# (into the harness's run directory). E.g. `--mesh 10:10` (features on, small tables) and
# `--mesh 1000:10000`; the run's table is the same as without it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HARNESS="$ROOT/../shared/bench/sidecar-pair.sh"
[ -x "$HARNESS" ] || { echo "bench-sidecar: $HARNESS not found" >&2; exit 1; }
PROTOCOL="${ISTHMUS_PROTOCOL:-http}"
H2_UPGRADE="${ISTHMUS_H2_UPGRADE:-on}"
EXTRA=""; ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --mesh) [ $# -ge 2 ] || { echo "--mesh needs ROUTES:ENDPOINTS" >&2; exit 2; }
            EXTRA=" --synthetic-mesh $2 --access-log {run}/access.log"; shift 2 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
# The sidecar as it ships: release, static, its executed code laid out together.
BIN="$("$ROOT/scripts/build-sidecar.sh")"
exec "$HARNESS" "${ARGS[@]}" --pair isthmus \
  "$BIN run --outbound {listen}={upstream} --sni {sni} --peer-id {spiffe_peer} --cert {cert} --key {key} --ca {ca} --protocol $PROTOCOL --h2-upgrade $H2_UPGRADE$EXTRA" \
  "$BIN run --inbound {listen}={upstream} --mtls STRICT --cert {cert} --key {key} --ca {ca} --protocol $PROTOCOL$EXTRA"
