#!/usr/bin/env bash
# Builds the sidecar as it ships, and prints the binary's path: the `ship` profile (release
# with whole-program LTO, cold crates built for size; see Cargo.toml), statically linked
# (`crt-static`) for this host's target, with the functions it runs laid out together
# (sidecar/build.rs, sidecar/link-order.txt).
#
# Both are about resident memory. The kernel maps 64 KiB around every page of code it faults
# in, so a dynamically linked sidecar also keeps most of libc.so's code resident (1.2 MiB
# a process, measured), where a static one holds only the libc functions it calls, among its
# own. An explicit --target keeps crt-static off the build scripts and proc macros.
#
#   scripts/build-sidecar.sh            # prints e.g. target/x86_64-unknown-linux-gnu/ship/sidecar
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOST="$(rustc -vV | sed -n 's/^host: //p')"
VAR="CARGO_TARGET_$(echo "$HOST" | tr 'a-z-' 'A-Z_')_RUSTFLAGS"
export "$VAR=-C target-feature=+crt-static"
cargo build --profile ship --locked -p sidecar --target "$HOST" --manifest-path "$ROOT/Cargo.toml" >&2
echo "$ROOT/target/$HOST/ship/sidecar"
