//! Throughput of the hash code xfer uses: SHA-256 (ring) next to the sha2 crate, and BLAKE3;
//! and whether this CPU has the SHA extensions.
//!
//! `cargo run --release --example hash-speed [MiB]` hashes a buffer already in memory five times
//! with each and prints the medians, so the figures are the CPU's, not the disk's.
//!
//! `hash-speed --file PATH [--hash sha256|blake3]` hashes one file once, read as the sender reads
//! it (the same `hash_reader`), and prints `DIGEST  PATH`: the hash floor `bench/run.py` measures
//! next to xfer (a first send cannot take less than one such pass).

use std::time::Instant;

use indicatif::ProgressBar;
use sha2::Digest as _;
use xfer::hash::{hash_reader, sha256_backend};
use xfer::protocol::HashAlg;

fn median_secs(mut f: impl FnMut()) -> f64 {
    let mut secs: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    secs.sort_by(f64::total_cmp);
    secs[2]
}

/// `--file PATH [--hash ALG]`: one pass over the file, as the sender hashes it.
fn hash_file(args: &[String]) {
    let path = args.get(1).expect("--file PATH");
    let alg = match args.iter().position(|a| a == "--hash").and_then(|i| args.get(i + 1)).map(String::as_str)
    {
        None | Some("sha256") => HashAlg::Sha256,
        Some("blake3") => HashAlg::Blake3,
        Some(other) => panic!("unknown hash {other}"),
    };
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let (digest, _) = hash_reader(alg, file, &ProgressBar::hidden()).expect("reading the file");
    println!("{}  {path}", digest.to_hex());
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--file") {
        return hash_file(&args);
    }
    let mib: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1024);
    let data: Vec<u8> =
        (0..mib * 1024 * 1024).map(|i| (i as u32).wrapping_mul(2_654_435_761) as u8).collect();
    let ours = median_secs(|| {
        std::hint::black_box(hash_reader(HashAlg::Sha256, &data[..], &ProgressBar::hidden()).unwrap());
    });
    let b3 = median_secs(|| {
        std::hint::black_box(hash_reader(HashAlg::Blake3, &data[..], &ProgressBar::hidden()).unwrap());
    });
    let sha2 = median_secs(|| {
        std::hint::black_box(sha2::Sha256::digest(&data));
    });
    let mbs = |s: f64| data.len() as f64 / s / 1e6;
    println!("cpu: {}; {mib} MiB in memory, median of 5", sha256_backend());
    println!("xfer (ring): {ours:.3} s = {:.0} MB/s", mbs(ours));
    println!("sha2 crate : {sha2:.3} s = {:.0} MB/s", mbs(sha2));
    println!("blake3     : {b3:.3} s = {:.0} MB/s (one thread, 1 MiB reads)", mbs(b3));
}
