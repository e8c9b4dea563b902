//! Release builds of the `sidecar` binary place the functions it runs next to each other.
//!
//! A proxy's resident memory is mostly its machine code: the kernel maps the 64 KiB around
//! each page of text it faults in, and start-up plus the request path touch code spread over
//! nearly every 64 KiB of the executable, so nearly all of it stays resident. `link-order.txt`
//! lists the functions a run executes (start-up, both sides, HTTP and new connections; made by
//! `scripts/link-order.sh` under callgrind); LLD lays them out first and in that order, so
//! what runs fits in a few MiB and the rest is never mapped. A name the build does not have
//! is skipped silently, so a stale list costs memory, never correctness.
//! `ISTHMUS_LINK_ORDER=off` builds without it.

fn main() {
    println!("cargo:rerun-if-changed=link-order.txt");
    println!("cargo:rerun-if-env-changed=ISTHMUS_LINK_ORDER");
    let release = std::env::var("PROFILE").as_deref() == Ok("release");
    // The list names symbols of this target, and LLD (rustc's default linker here) reads it.
    let target = std::env::var("TARGET").as_deref() == Ok("x86_64-unknown-linux-gnu");
    let wanted = std::env::var("ISTHMUS_LINK_ORDER").as_deref() != Ok("off");
    if release && target && wanted {
        let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
        println!("cargo:rustc-link-arg-bin=sidecar=-Wl,--symbol-ordering-file={dir}/link-order.txt");
        println!("cargo:rustc-link-arg-bin=sidecar=-Wl,--no-warn-symbol-ordering");
    }
}
