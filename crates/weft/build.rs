//! Compiles the udp backend's kernel fast path (`bpf/udp_fastpath.c`) with clang into the
//! object `src/udp/fastpath.rs` embeds.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "bpf/udp_fastpath.c";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-env-changed=CLANG");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("udp_fastpath.o");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    // The kernel headers' <asm/types.h> lives under the multiarch directory on Debian.
    let multiarch = Command::new("gcc")
        .arg("-print-multiarch")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("{}-linux-gnu", std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default()));
    let status = Command::new(&clang)
        .args(["-O2", "-target", "bpf", "-Wall", "-Werror", "-c", src, "-o"])
        .arg(&out)
        .arg(format!("-I/usr/include/{multiarch}"))
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{clang} failed to compile {src} ({s})"),
        Err(e) => panic!(
            "cannot run {clang} ({e}): the udp fast path is compiled with clang; run scripts/install-deps.sh \
             (installs clang) or set CLANG to a clang that has the bpf target"
        ),
    }
}
