//! What the benchmark examples share: the weft binary to run, a process's RSS, and a small
//! deterministic generator.
#![allow(dead_code)]

/// The weft binary beside this example's build (`target/<profile>/weft`), or `WEFT_BIN`
/// (to compare two builds in one run).
pub fn weft_bin() -> String {
    if let Some(b) = std::env::var_os("WEFT_BIN") {
        return b.to_string_lossy().into_owned();
    }
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join("weft").display().to_string()
}

/// Process `pid`'s resident memory (`VmRSS`) in MiB; 0 once it is gone.
pub fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    kib as f64 / 1024.0
}

/// A small deterministic generator (xorshift; no dependency, the same cluster every run).
pub struct Rng(pub u64);

impl Rng {
    /// A number below `n` (0 for `n` = 0).
    pub fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }
}
