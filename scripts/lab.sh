#!/usr/bin/env bash
# The main job: builds Isthmus and brings up the lab on its embedded default topology —
# three clusters, each its own network with a controller, an east-west gateway and
# bookinfo's productpage and reviews behind capturing sidecars — and ends when productpage
# in every cluster has reached reviews in every cluster through mTLS, across networks
# only through the gateways. The lab stays up; `target/release/isthmus lab down` removes it.
#
# With root it builds network namespaces, veths and iptables capture, installing iproute2,
# iptables and procps when missing. Without root it runs the same topology on loopback
# (127.k.0.0/16 per cluster), and says plainly that networks are then not enforced.
# Arguments go to `isthmus lab up` (e.g. a topology: multi-primary, single-primary,
# primary-remote, or a file).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  # Real networks need root: take it where sudo gives it without asking.
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    echo "==> re-running as root (sudo) for network namespaces"
    # Secure_path would hide the user's cargo and rustup: hand them over explicitly.
    exec sudo -n env "PATH=$PATH" "CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}" \
      "RUSTUP_HOME=${RUSTUP_HOME:-$HOME/.rustup}" "$0" "$@"
  fi
  echo "==> not root: the lab runs on loopback, without network namespaces (run it as root for real networks)"
fi
need=()
command -v ip >/dev/null || need+=(iproute2)
command -v iptables-restore >/dev/null || need+=(iptables)
command -v sysctl >/dev/null || need+=(procps)
if [ ${#need[@]} -gt 0 ] && [ "$(id -u)" = 0 ]; then
  echo "==> installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "${need[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null; apt-get install -y -q "${need[@]}" >/dev/null; }
fi

echo "==> building (release; the first build takes a few minutes)"
cargo build --release --locked -p lab -p federation-controller -p eastwest-gateway -p sidecar

# A lab left from an earlier run is taken down first (idempotent).
target/release/isthmus lab down >/dev/null 2>&1 || true
target/release/isthmus lab up "$@"
echo
echo "The lab is up. Take it down with: target/release/isthmus lab down"
