#!/usr/bin/env bash
# Regenerates sidecar/link-order.txt: the functions a sidecar pair executes, in the order it
# first executes them, which release builds lay out next to each other (see sidecar/build.rs).
#
# Builds the sidecar as the benchmark does (scripts/build-sidecar.sh), runs a pair
# (client side and server side, mTLS between them, an nginx backend) under callgrind, and
# drives it with the shared load client through what the benchmarks measure: keep-alive
# requests, new connections, idle connections, and the same again with routing,
# authorization and an access log on (--synthetic-mesh). Every function either side ran is
# listed. Takes a few minutes; run it after changes that move the request path, and commit
# the list. A stale list is harmless (unknown names are skipped), it only costs memory.
#
#   scripts/link-order.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
for c in valgrind nginx openssl ss; do
  command -v "$c" >/dev/null || { echo "link-order: $c is needed (apt-get install valgrind nginx openssl iproute2)" >&2; exit 1; }
done
HOST="$(rustc -vV | sed -n 's/^host: //p')"
BIN="$(scripts/build-sidecar.sh)"
LOAD_DIR="$ROOT/../shared/bench/sni-bench"
export CARGO_TARGET_DIR="${SNI_BENCH_TARGET:-${XDG_CACHE_HOME:-$HOME/.cache}/isthmus-sni-bench}"
(cd "$LOAD_DIR" && cargo build --release -q)
LOAD="$CARGO_TARGET_DIR/release/sni-bench"
unset CARGO_TARGET_DIR

RUN="$(mktemp -d /tmp/link-order.XXXXXX)"
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$RUN"; }
trap cleanup EXIT

free_port() { local p; for p in $(seq "$1" $(($1 + 200))); do ss -ltn | grep -q ":$p " || { echo "$p"; return; }; done; return 1; }
wait_port() {  # PORT: until something listens, at most 60 s (valgrind starts slowly)
  local deadline=$((SECONDS + 60))
  until ss -ltn | grep -q ":$1 "; do [ $SECONDS -lt $deadline ] || { echo "link-order: nothing listens on $1" >&2; return 1; }; sleep 0.2; done
}

# A mesh CA, the two sides' SVIDs, as the benchmark makes them.
P="$RUN/pki"; mkdir -p "$P"
SVC=reviews.default.svc.cluster.local
(
  cd "$P"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj "/CN=link-order root" \
    -keyout ca.key -out ca.pem -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign 2>/dev/null
  for side in client:productpage server:reviews; do
    n="${side%%:*}"; sa="${side##*:}"
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/O=link-order" -keyout "$n.key" -out "$n.csr" 2>/dev/null
    printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
      "extendedKeyUsage=serverAuth,clientAuth" "subjectAltName=URI:spiffe://cluster.local/ns/default/sa/$sa" > "$n.ext"
    openssl x509 -req -in "$n.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile "$n.ext" -out "$n.pem" 2>/dev/null
  done
)

BACKEND_PORT="$(free_port 28500)"
mkdir -p "$RUN/nginx"
cat > "$RUN/nginx/nginx.conf" <<EOF
daemon off; worker_processes 1; pid $RUN/nginx/pid; error_log $RUN/nginx/error.log warn;
events { worker_connections 4096; }
http { access_log off; client_body_temp_path $RUN/nginx; proxy_temp_path $RUN/nginx;
  fastcgi_temp_path $RUN/nginx; uwsgi_temp_path $RUN/nginx; scgi_temp_path $RUN/nginx;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$BACKEND_PORT; location / { return 200 "$(head -c 1023 /dev/zero | tr '\0' x)"; } } }
EOF
nginx -p "$RUN/nginx" -c "$RUN/nginx/nginx.conf" > "$RUN/nginx/out.log" 2>&1 &
PIDS+=($!)
wait_port "$BACKEND_PORT"

VG=(valgrind --tool=callgrind --demangle=no --dump-instr=no --collect-jumps=no --compress-strings=no)
round() {  # NAME [ROUTES:ENDPOINTS]: one pair under callgrind through every kind of load
  local name="$1" mesh="${2:-}"
  local in out server_extra=() client_extra=()
  if [ -n "$mesh" ]; then
    server_extra=(--synthetic-mesh "$mesh" --access-log "$RUN/$name.server.access.log")
    client_extra=(--synthetic-mesh "$mesh" --access-log "$RUN/$name.client.access.log")
  fi
  in="$(free_port 25600)"; out="$(free_port 25700)"
  "${VG[@]}" --callgrind-out-file="$RUN/$name.server" "$BIN" run --inbound "127.0.0.1:$in=127.0.0.1:$BACKEND_PORT" \
    --mtls STRICT --cert "$P/server.pem" --key "$P/server.key" --ca "$P/ca.pem" --protocol http "${server_extra[@]}" > "$RUN/$name.server.log" 2>&1 &
  local server=$!; PIDS+=("$server")
  "${VG[@]}" --callgrind-out-file="$RUN/$name.client" "$BIN" run --outbound "127.0.0.1:$out=127.0.0.1:$in" \
    --sni "outbound_.9080_._.$SVC" --peer-id spiffe://cluster.local/ns/default/sa/reviews \
    --cert "$P/client.pem" --key "$P/client.key" --ca "$P/ca.pem" --protocol http "${client_extra[@]}" > "$RUN/$name.client.log" 2>&1 &
  local client=$!; PIDS+=("$client")
  wait_port "$in"; wait_port "$out"
  local load=(--addr "127.0.0.1:$out" --plain --host "$SVC" --path /)
  timeout 120 "$LOAD" probe "${load[@]}" --timeout 30 >/dev/null
  timeout 120 "$LOAD" lat "${load[@]}" --conns 20 --rate 100000 --duration 3 >/dev/null
  timeout 120 "$LOAD" conn "${load[@]}" --conns 16 --duration 2 --max 2000 >/dev/null
  timeout 120 "$LOAD" idle "${load[@]}" --count 200 --conns 50 --hold 1 >/dev/null
  timeout 120 "$LOAD" lat "${load[@]}" --conns 32 --rate 1000000 --duration 2 >/dev/null
  kill -TERM "$client" "$server"
  wait "$client" "$server" 2>/dev/null || true
}
round plain
round mesh 10:10

# Function names as callgrind saw them (mangled), first appearance first; addresses without
# a symbol are left out.
# Valgrind's virtual CPU makes glibc pick other variants of memcpy and friends than the real
# one will (AVX2 rather than EVEX/AVX-512), so every variant of a function that ran is listed.
nm --defined-only "$BIN" | awk '{print $3}' > "$RUN/symbols"
python3 - "$RUN/symbols" "$RUN"/plain.client "$RUN"/plain.server "$RUN"/mesh.client "$RUN"/mesh.server > sidecar/link-order.txt <<'EOF'
import re, sys
symbols = [s.strip() for s in open(sys.argv[1])]
variants = {}
for s in symbols:
    m = re.match(r"^(__[a-z0-9]+)_(sse2|ssse3|sse4|sse42|avx|avx2|evex|avx512)", s)
    if m:
        variants.setdefault(m.group(1), []).append(s)
seen = set()
def emit(name):
    if name not in seen:
        seen.add(name)
        print(name)
for path in sys.argv[2:]:
    for line in open(path, errors="replace"):
        m = re.match(r"^c?fn=(?:\(\d+\) )?(.+)$", line.rstrip("\n"))
        if not m or m.group(1).startswith("0x"):
            continue
        name = m.group(1)
        emit(name)
        v = re.match(r"^(__[a-z0-9]+)_", name)
        for sibling in variants.get(v.group(1), []) if v else []:
            emit(sibling)
EOF
echo "link-order: $(wc -l < sidecar/link-order.txt) functions in sidecar/link-order.txt (for $HOST)"
