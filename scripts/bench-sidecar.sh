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
# server side checks it against an ALLOW policy of ROUTES rules), write an access log (into
# the harness's run directory) and export a span per request and hop over OTLP/HTTP to a
# sink this script starts (an nginx answering 200 to every POST, on 127.0.0.1). E.g.
# `--mesh 10:10` (features on, small tables) and `--mesh 1000:10000`; the run's table is the
# same as without it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HARNESS="$ROOT/../shared/bench/sidecar-pair.sh"
[ -x "$HARNESS" ] || { echo "bench-sidecar: $HARNESS not found" >&2; exit 1; }
PROTOCOL="${ISTHMUS_PROTOCOL:-http}"
H2_UPGRADE="${ISTHMUS_H2_UPGRADE:-on}"
EXTRA=""; ARGS=(); MESH=""
while [ $# -gt 0 ]; do
  case "$1" in
    --mesh) [ $# -ge 2 ] || { echo "--mesh needs ROUTES:ENDPOINTS" >&2; exit 2; }
            MESH="$2"; shift 2 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
# The sidecar as it ships: release, static, its executed code laid out together.
BIN="$("$ROOT/scripts/build-sidecar.sh")"
if [ -n "$MESH" ]; then
  command -v nginx >/dev/null || { echo "bench-sidecar: --mesh needs nginx (the OTLP sink)" >&2; exit 1; }
  SINK="$(mktemp -d /tmp/bench-otlp-sink.XXXXXX)"
  SINK_PORT=""
  for p in $(seq 14318 14418); do ss -ltn | grep -q "127.0.0.1:$p " || { SINK_PORT=$p; break; }; done
  [ -n "$SINK_PORT" ] || { echo "bench-sidecar: no free port for the OTLP sink" >&2; exit 1; }
  cat > "$SINK/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $SINK/nginx.pid; error_log $SINK/error.log;
events { worker_connections 64; }
http {
  access_log off; client_body_temp_path $SINK; client_max_body_size 64m;
  server { listen 127.0.0.1:$SINK_PORT; location / { return 200; } }
}
CONF
  nginx -p "$SINK" -c "$SINK/nginx.conf" & SINK_PID=$!
  trap 'kill "$SINK_PID" 2>/dev/null; wait "$SINK_PID" 2>/dev/null; rm -rf "$SINK"' EXIT
  deadline=$((SECONDS + 10))
  until ss -ltn | grep -q "127.0.0.1:$SINK_PORT "; do
    [ $SECONDS -lt $deadline ] || { echo "bench-sidecar: the OTLP sink did not start ($SINK/error.log)" >&2; exit 1; }
    sleep 0.1
  done
  EXTRA=" --synthetic-mesh $MESH --access-log {run}/access.log --otlp http://127.0.0.1:$SINK_PORT"
fi
"$HARNESS" "${ARGS[@]}" --pair isthmus \
  "$BIN run --outbound {listen}={upstream} --sni {sni} --peer-id {spiffe_peer} --cert {cert} --key {key} --ca {ca} --protocol $PROTOCOL --h2-upgrade $H2_UPGRADE$EXTRA" \
  "$BIN run --inbound {listen}={upstream} --mtls STRICT --cert {cert} --key {key} --ca {ca} --protocol $PROTOCOL$EXTRA"
