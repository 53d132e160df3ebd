//! SHA-256 throughput of the hash code xfer uses, and which backend sha2 picked on this CPU.
//!
//! `cargo run --release --example hash-speed [MiB]` hashes a buffer already in memory five times
//! and prints the median, so the figure is the CPU's, not the disk's.

use std::time::Instant;

use indicatif::ProgressBar;
use xfer::hash::{hash_reader, sha256_backend};

fn main() {
    let mib: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1024);
    let data: Vec<u8> = (0..mib * 1024 * 1024).map(|i| (i as u32).wrapping_mul(2_654_435_761) as u8).collect();
    let mut secs: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            let _ = hash_reader(&data[..], &ProgressBar::hidden()).unwrap();
            t.elapsed().as_secs_f64()
        })
        .collect();
    secs.sort_by(f64::total_cmp);
    let median = secs[2];
    println!(
        "sha256 backend: {}; {mib} MiB in {median:.3} s median of 5 = {:.0} MB/s",
        sha256_backend(),
        data.len() as f64 / median / 1e6
    );
}
