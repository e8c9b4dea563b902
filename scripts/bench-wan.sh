#!/usr/bin/env bash
# Bulk throughput of the mesh hop over a WAN-like link (needs root): 64 MiB down and up
# through our sidecar pair (pooled mTLS, HTTP/2 between the sidecars by default) against
# the same transfer over a direct connection, across a link with DELAY of one-way delay.
#
#   netns isth-a: curl, client sidecar --veth--> netns isth-t: `isthmus lab wan-relay`
#   (frames toward isth-a held for DELAY) --veth--> netns isth-b: server sidecar, backend
#
# The relay is the lab's userspace WAN emulator (this machine's kernel has no sch_netem),
# so the absolute rates are the relay's as much as the link's; compare the rows.
#   sudo scripts/bench-wan.sh                 # DELAY=50ms REPS=2
#   DELAY=100ms H2=off scripts/bench-wan.sh   # H2=off: the HTTP/1.1 hop
# Everything stays in the three namespaces it makes, and is removed on exit.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ "$(id -u)" = 0 ] || { echo "bench-wan: needs root (network namespaces)" >&2; exit 1; }
DELAY="${DELAY:-50ms}"; REPS="${REPS:-2}"; H2="${H2:-on}"
cargo build --release -q --manifest-path "$ROOT/Cargo.toml" -p sidecar -p lab
BIN="$ROOT/target/release/sidecar"; LAB="$ROOT/target/release/isthmus"

namespaces_down() {
  for n in a b t; do ip netns pids "isth-$n" 2>/dev/null | xargs -r kill 2>/dev/null || true; done
  for n in a b t; do ip netns del "isth-$n" 2>/dev/null || true; done
}
namespaces_down  # a run that was cut short
W="$(mktemp -d /tmp/isthmus-wan.XXXXXX)"
trap 'namespaces_down; rm -rf "$W"' EXIT

# SVIDs for both sides from a throwaway CA.
svid() {  # NAME SA
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/O=isthmus-wan" \
    -keyout "$W/$1.key" -out "$W/$1.csr" 2>/dev/null
  printf 'subjectAltName=URI:spiffe://cluster.local/ns/default/sa/%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$2" > "$W/$1.ext"
  openssl x509 -req -in "$W/$1.csr" -CA "$W/ca.pem" -CAkey "$W/ca.key" -CAcreateserial -days 1 \
    -extfile "$W/$1.ext" -out "$W/$1.pem" 2>/dev/null
}
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/O=isthmus-wan-ca" \
  -days 1 -keyout "$W/ca.key" -out "$W/ca.pem" 2>/dev/null
svid client productpage; svid server reviews

ip netns add isth-a; ip netns add isth-b; ip netns add isth-t
ip link add isth-va type veth peer name isth-ta
ip link add isth-vb type veth peer name isth-tb
ip link set isth-va netns isth-a; ip link set isth-vb netns isth-b
ip link set isth-ta netns isth-t; ip link set isth-tb netns isth-t
for n in a b t; do ip -n "isth-$n" link set lo up; done
ip -n isth-t link set isth-ta up; ip -n isth-t link set isth-tb up
ip -n isth-a addr add 10.99.0.1/24 dev isth-va; ip -n isth-a link set isth-va up
ip -n isth-b addr add 10.99.0.2/24 dev isth-vb; ip -n isth-b link set isth-vb up
ip netns exec isth-t "$LAB" lab wan-relay --gateway-side isth-ta --bridge-side isth-tb \
  --delay "$DELAY" --limit 200000 > "$W/relay.log" 2>&1 &

# The backend: 64 MiB for a GET, the byte count of a POST's body.
cat > "$W/backend.py" <<'EOF'
import http.server, sys
BLOB = b"x" * (64 << 20)
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200); self.send_header("content-length", str(len(BLOB))); self.end_headers()
        view = memoryview(BLOB)
        for i in range(0, len(BLOB), 1 << 20):
            self.wfile.write(view[i:i + (1 << 20)])
    def do_POST(self):
        left = int(self.headers["content-length"]); got = 0
        while left > 0:
            chunk = self.rfile.read(min(1 << 20, left))
            if not chunk:
                break
            got += len(chunk); left -= len(chunk)
        body = str(got).encode()
        self.send_response(200); self.send_header("content-length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
EOF
ip netns exec isth-b python3 "$W/backend.py" 0.0.0.0 8080 &
ip netns exec isth-b "$BIN" run --inbound 10.99.0.2:15006=127.0.0.1:8080 --mtls STRICT \
  --cert "$W/server.pem" --key "$W/server.key" --ca "$W/ca.pem" --protocol http > "$W/server.log" 2>&1 &
ip netns exec isth-a "$BIN" run --outbound 127.0.0.1:15001=10.99.0.2:15006 \
  --sni outbound_.9080_._.reviews.default.svc.cluster.local \
  --peer-id spiffe://cluster.local/ns/default/sa/reviews \
  --cert "$W/client.pem" --key "$W/client.key" --ca "$W/ca.pem" --protocol http --h2-upgrade "$H2" \
  > "$W/client.log" 2>&1 &
head -c $((64 << 20)) /dev/zero > "$W/up.bin"
transfer() {  # PRINTS MB/s; curl args...
  ip netns exec isth-a curl -sS -o /dev/null --max-time 120 -w '%{http_code} %{speed_download} %{speed_upload}' "$@"
}
ready=""
for _ in $(seq 100); do
  if [ "$(transfer -H 'host: reviews:9080' -r 0-0 http://127.0.0.1:15001/ 2>/dev/null | cut -d' ' -f1)" = 200 ]; then ready=1; break; fi
  sleep 0.1
done
[ -n "$ready" ] || { echo "bench-wan: the pair did not answer; logs in $W" >&2; cat "$W"/*.log >&2; exit 1; }

echo "one-way delay $DELAY, 64 MiB each way, hop HTTP/2 $H2; MB/s"
printf '%-8s %10s %10s\n' path GET POST
for rep in $(seq "$REPS"); do
  for path in direct sidecar; do
    if [ "$path" = direct ]; then url=http://10.99.0.2:8080/; host=(); else url=http://127.0.0.1:15001/; host=(-H 'host: reviews:9080'); fi
    read -r code down _ <<< "$(transfer "${host[@]}" "$url")"
    [ "$code" = 200 ] || { echo "bench-wan: $path GET answered $code" >&2; exit 1; }
    read -r code _ up <<< "$(transfer "${host[@]}" --data-binary @"$W/up.bin" "$url")"
    [ "$code" = 200 ] || { echo "bench-wan: $path POST answered $code" >&2; exit 1; }
    awk -v p="$path" -v d="$down" -v u="$up" 'BEGIN { printf "%-8s %10.1f %10.1f\n", p, d / 1e6, u / 1e6 }'
  done
done
