//! The cost of the chunk size alone: 1 GiB through xfer's framing over loopback TCP, without
//! hashing or files, for several chunk sizes, interleaved, median of 5.
//!
//! `cargo run --release --example framing [MiB]`. The sender writes frame header + chunk through
//! a 256 KiB `BufWriter` (as `xfer send` does); the receiver parses frames through a 256 KiB
//! `BufReader` and copies each payload into a buffer (as `xfer recv` does before hashing). On a
//! CPU where hashing is fast (SHA extensions, BLAKE3) this is the part the chunk size decides.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

use xfer::protocol::{FrameKind, read_frame_header, write_frame_header};

const BUF: usize = 256 * 1024;

fn one_run(total: usize, chunk: usize, data: &[u8]) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let recv = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut r = BufReader::with_capacity(BUF, s);
        let mut buf = vec![0u8; BUF];
        let mut got = 0usize;
        while got < total {
            let h = read_frame_header(&mut r).unwrap();
            let mut left = h.len as usize;
            while left > 0 {
                let n = left.min(BUF);
                r.read_exact(&mut buf[..n]).unwrap();
                left -= n;
            }
            got += h.len as usize;
        }
    });
    let start = Instant::now();
    let s = TcpStream::connect(addr).unwrap();
    let mut w = BufWriter::with_capacity(BUF, &s);
    let mut sent = 0usize;
    while sent < total {
        let n = chunk.min(total - sent);
        let off = sent % (data.len() - n);
        write_frame_header(&mut w, FrameKind::Data, n as u32).unwrap();
        w.write_all(&data[off..off + n]).unwrap();
        sent += n;
    }
    w.flush().unwrap();
    recv.join().unwrap();
    start.elapsed().as_secs_f64()
}

fn main() {
    let mib: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1024);
    let total = mib << 20;
    let data: Vec<u8> = (0..8 << 20).map(|i: u32| i.wrapping_mul(2_654_435_761) as u8).collect();
    let chunks = [1024usize, 4096, 16384, 65536, 262_144, 1 << 20];
    let mut secs = vec![Vec::new(); chunks.len()];
    for _ in 0..5 {
        for (i, &c) in chunks.iter().enumerate() {
            secs[i].push(one_run(total, c, &data));
        }
    }
    let medians: Vec<f64> = secs
        .iter_mut()
        .map(|v| {
            v.sort_by(f64::total_cmp);
            v[2]
        })
        .collect();
    let best = medians.iter().copied().fold(f64::INFINITY, f64::min);
    println!("{mib} MiB through framing over loopback, median of 5, interleaved");
    for (c, m) in chunks.iter().zip(&medians) {
        println!("chunk {c:>8}: {m:.3} s  {:>6.0} MB/s  {:.2}x best", total as f64 / m / 1e6, m / best);
    }
}
