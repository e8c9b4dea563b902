#!/usr/bin/env bash
# The gateway demo: builds the east-west gateway and carries one real mutual-TLS
# connection through it, end to end, so you can watch every step.
#
#   openssl s_client ──mTLS, SNI outbound_.9080_._.reviews…──► eastwest-gateway :15443
#        (client SVID productpage)                                   │ reads the SNI only,
#                                                                    │ splices the bytes
#   openssl s_server (reviews, requires a client cert) ◄─────────────┘
#
# The backend answers with the client certificate it saw: proof that the TLS
# session is the client's own, end to end, and the gateway never terminated it.
# Everything stays on 127.0.0.1 and is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
command -v openssl >/dev/null || {
  [ "$(id -u)" = 0 ] || { echo "openssl is needed (apt-get install openssl)" >&2; exit 1; }
  step "installing openssl"; apt-get install -y -q openssl >/dev/null 2>&1 || { apt-get update -q >/dev/null; apt-get install -y -q openssl >/dev/null; }
}

RUN="$(mktemp -d -t isthmus-demo.XXXXXX)"
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$RUN"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
# Waits for a listening socket without connecting to it (a probe connection would
# show up in the gateway's counters as a client that closed early).
listening() { if command -v ss >/dev/null; then [ -n "$(ss -ltnH "sport = :$1")" ]; else (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; fi; }
wait_port() { for _ in $(seq 200); do listening "$1" && return 0; sleep 0.05; done; return 1; }

HOST=reviews.default.svc.cluster.local
SNI="outbound_.9080_._.$HOST"

step "building the gateway (cargo build --release -p eastwest-gateway)"
cargo build --release -q -p eastwest-gateway
GW=target/release/eastwest-gateway

step "making a mesh CA and two SPIFFE SVIDs (productpage, reviews) in $RUN"
cd "$RUN"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj "/O=isthmus demo/CN=demo mesh CA" \
  -keyout ca.key -out ca.pem -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign 2>/dev/null
svid() {  # NAME SPIFFE-ID [DNS]
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/O=isthmus demo" -keyout "$1.key" -out "$1.csr" 2>/dev/null
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=URI:%s%s\n' \
    "$2" "${3:+,DNS:$3}" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile "$1.ext" -out "$1.pem" 2>/dev/null
  echo "    $1: $2"
}
svid productpage spiffe://cluster.local/ns/default/sa/productpage
svid reviews spiffe://cluster.local/ns/default/sa/reviews "$HOST"
cd - >/dev/null

BACKEND=$(free_port)
step "starting the reviews backend: openssl s_server on 127.0.0.1:$BACKEND, client certificate REQUIRED"
openssl s_server -accept "127.0.0.1:$BACKEND" -cert "$RUN/reviews.pem" -key "$RUN/reviews.key" \
  -CAfile "$RUN/ca.pem" -Verify 1 -verify_return_error -alpn istio -www -quiet > "$RUN/backend.log" 2>&1 &
PIDS+=($!)
wait_port "$BACKEND" || { cat "$RUN/backend.log"; exit 1; }

step "starting the east-west gateway on 127.0.0.1:15443: --route $SNI=127.0.0.1:$BACKEND"
"$GW" --listen 127.0.0.1:15443 --health 127.0.0.1:15021 --metrics 127.0.0.1:15090 --admin 127.0.0.1:15000 \
  --route "$SNI=127.0.0.1:$BACKEND" > "$RUN/gateway.out" 2> "$RUN/gateway.log" &
PIDS+=($!)
wait_port 15443 || { cat "$RUN/gateway.log"; exit 1; }
sed 's/^/    /' "$RUN/gateway.out"

step "productpage calls reviews through the gateway (openssl s_client -servername $SNI -alpn istio)"
printf 'GET / HTTP/1.0\r\n\r\n' | timeout 10 openssl s_client -connect 127.0.0.1:15443 -servername "$SNI" -alpn istio \
  -cert "$RUN/productpage.pem" -key "$RUN/productpage.key" -CAfile "$RUN/ca.pem" -verify_hostname "$HOST" \
  -verify_return_error -ign_eof > "$RUN/client.out" 2>&1 || true
grep -E "^(Verify return code|ALPN protocol|Protocol *:)" "$RUN/client.out" | sort -u | sed 's/^/    client: /'
# s_server -www answers with the peer certificate it verified; s_client never prints
# its own, so this name can only have come from the backend's side of the session.
if sed -n '/^Client certificate/,$p' "$RUN/client.out" | grep -q 'URI:spiffe://cluster.local/ns/default/sa/productpage'; then
  echo "    backend: verified the client certificate spiffe://cluster.local/ns/default/sa/productpage"
  echo "    => the TLS session was the client's own, end to end; the gateway held no key."
else
  echo "    backend did not report the client certificate; its answer was:"; sed 's/^/      /' "$RUN/client.out" | head -40
  exit 1
fi

step "an unknown service name is closed at once"
printf '' | timeout 5 openssl s_client -connect 127.0.0.1:15443 -servername outbound_.9080_._.nosuch.default.svc.cluster.local \
  -alpn istio > "$RUN/reject.out" 2>&1 || true
grep -qE "errno|unexpected eof|handshake failure|write:errno|Connection reset|no peer certificate available" "$RUN/reject.out" \
  && echo "    closed without a TLS answer, as it should be"

step "what the gateway counted (http://127.0.0.1:15090/stats/prometheus)"
exec 3<>/dev/tcp/127.0.0.1/15090
printf 'GET /stats/prometheus HTTP/1.0\r\n\r\n' >&3
grep -E '^(istio_tcp_connections_(opened|closed)_total|istio_tcp_(sent|received)_bytes_total|isthmus_gateway_rejected_connections_total)' <&3 \
  | sed -E 's/\{.*destination_service="([^"]*)".*\}/{destination_service="\1",…}/; s/^/    /'
echo
echo "Done. The gateway's admin page (routes, endpoint health) was at http://127.0.0.1:15000/config_dump."
