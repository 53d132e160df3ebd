//! A delay line without kernel modules (no netem): forwards IP packets between two TUN devices,
//! one in each of two network namespaces, holding every packet for a fixed one-way delay
//! (a timed FIFO per direction: packets leave in the order they came, each `--delay-us` after it
//! was read). bench/link.py puts `tc tbf` on both TUN devices for the rate, so a packet sees the
//! rate on the way out of its namespace, then the delay, then arrives in the other namespace.
//!
//! ```text
//! cargo build --release --example delayline
//! target/release/examples/delayline NS_A:IF_A NS_B:IF_B --delay-us 25000 [--offload]
//! ```
//!
//! Needs root. The namespaces must exist (`ip netns add`); the program creates the two TUN
//! devices in them (IFF_TUN | IFF_NO_PI; opened after `setns` into each namespace, so each device
//! lives there while this process holds both descriptors), prints `ready` on stdout, then
//! forwards until SIGTERM or SIGINT, and prints its counters on stderr. The devices disappear
//! when it exits. Addresses, MTU and qdiscs are the caller's business (`ip -n NS ...`).
//!
//! `--offload` opens the devices with IFF_VNET_HDR and TUNSETOFFLOAD (checksum, TSO4, TSO6): the
//! stack then hands over TCP super-packets of up to 64 KiB with a virtio-net header, which are
//! written unchanged to the other device (one read and one write per up to ~45 segments instead
//! of per segment). Without it every segment is a read and a write.
//!
//! One thread: `ppoll` on both descriptors with a timeout until the next packet is due; reads
//! every packet that is there (non-blocking), releases every packet whose time has come.

use std::collections::VecDeque;
use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUN_F_CSUM: libc::c_ulong = 0x01;
const TUN_F_TSO4: libc::c_ulong = 0x02;
const TUN_F_TSO6: libc::c_ulong = 0x04;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// Largest packet read: a 64 KiB super-packet plus its virtio-net header.
const MAX_PACKET: usize = 65536 + 64;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn die(what: &str) -> ! {
    eprintln!("delayline: error: {what}: {}", std::io::Error::last_os_error());
    std::process::exit(1);
}

fn open_path(path: &str, flags: libc::c_int) -> OwnedFd {
    let c = CString::new(path).unwrap();
    // SAFETY: a valid NUL-terminated path; the descriptor is owned from here on.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        die(&format!("open {path}"));
    }
    // SAFETY: fd was just returned by open and is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn enter(ns: &OwnedFd, what: &str) {
    // SAFETY: setns on a namespace descriptor; affects only this (single) thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        die(&format!("setns {what}"));
    }
}

/// Creates TUN device `ifname` inside network namespace `ns` and returns its descriptor.
fn tun_in(ns: &str, ifname: &str, home: &OwnedFd, offload: bool) -> OwnedFd {
    if ifname.len() >= 16 {
        eprintln!("delayline: error: interface name {ifname:?} is longer than 15 bytes");
        std::process::exit(2);
    }
    let target = open_path(&format!("/run/netns/{ns}"), libc::O_RDONLY);
    enter(&target, ns);
    // The device is created in the namespace of the process that opened /dev/net/tun.
    let fd = open_path("/dev/net/tun", libc::O_RDWR | libc::O_NONBLOCK);
    enter(home, "back to the original namespace");
    let mut req = IfReq { name: [0; 16], flags: IFF_TUN | IFF_NO_PI, _pad: [0; 22] };
    if offload {
        req.flags |= IFF_VNET_HDR;
    }
    req.name[..ifname.len()].copy_from_slice(ifname.as_bytes());
    // SAFETY: TUNSETIFF reads (and may write) a struct ifreq, which IfReq lays out.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } != 0 {
        die(&format!("TUNSETIFF {ns}:{ifname}"));
    }
    if offload {
        let flags = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;
        // SAFETY: TUNSETOFFLOAD takes an unsigned long by value.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD, flags) } != 0 {
            die(&format!("TUNSETOFFLOAD {ns}:{ifname}"));
        }
    }
    fd
}

#[derive(Default)]
struct Counters {
    packets: u64,
    bytes: u64,
    write_errors: u64,
    max_queued: usize,
}

struct Direction {
    queue: VecDeque<(Instant, Box<[u8]>)>,
    count: Counters,
}

fn main() {
    let mut ends = Vec::new();
    let mut delay = None;
    let mut offload = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--delay-us" => delay = args.next().and_then(|v| v.parse::<u64>().ok()),
            "--offload" => offload = true,
            _ if a.contains(':') && !a.starts_with('-') => ends.push(a),
            _ => {
                eprintln!("usage: delayline NS_A:IF_A NS_B:IF_B --delay-us MICROSECONDS [--offload]");
                std::process::exit(2);
            }
        }
    }
    let (Some(delay), [a, b]) = (delay, ends.as_slice()) else {
        eprintln!("usage: delayline NS_A:IF_A NS_B:IF_B --delay-us MICROSECONDS [--offload]");
        std::process::exit(2);
    };
    let delay = Duration::from_micros(delay);
    let home = open_path("/proc/self/ns/net", libc::O_RDONLY);
    let fds: Vec<OwnedFd> = [a, b]
        .iter()
        .map(|end| {
            let (ns, ifname) = end.split_once(':').unwrap();
            tun_in(ns, ifname, &home, offload)
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).unwrap();
    }
    println!("ready");
    std::io::stdout().flush().unwrap();

    // dirs[i] holds what was read from fds[i], to be written to fds[1 - i].
    let mut dirs: [Direction; 2] =
        std::array::from_fn(|_| Direction { queue: VecDeque::new(), count: Counters::default() });
    let mut scratch = vec![0u8; MAX_PACKET];
    let mut pfds: [libc::pollfd; 2] =
        std::array::from_fn(|i| libc::pollfd { fd: fds[i].as_raw_fd(), events: libc::POLLIN, revents: 0 });
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let next = dirs.iter().filter_map(|d| d.queue.front().map(|p| p.0)).min();
        let wait = next.map_or(Duration::from_millis(100), |t| t.saturating_duration_since(now));
        let ts = libc::timespec {
            tv_sec: wait.as_secs() as libc::time_t,
            tv_nsec: wait.subsec_nanos() as libc::c_long,
        };
        // SAFETY: two valid pollfds, a valid timespec, no signal mask change.
        let n = unsafe { libc::ppoll(pfds.as_mut_ptr(), 2, &ts, std::ptr::null()) };
        if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            die("ppoll");
        }
        for (i, dir) in dirs.iter_mut().enumerate() {
            if pfds[i].revents & libc::POLLIN == 0 {
                continue;
            }
            // Read what is there (a bounded batch, so the other direction is not starved).
            let due = Instant::now() + delay;
            for _ in 0..512 {
                // SAFETY: reading into scratch, which is MAX_PACKET bytes long.
                let r = unsafe { libc::read(pfds[i].fd, scratch.as_mut_ptr().cast(), scratch.len()) };
                if r <= 0 {
                    break;
                }
                dir.queue.push_back((due, scratch[..r as usize].into()));
            }
            dir.count.max_queued = dir.count.max_queued.max(dir.queue.len());
        }
        let now = Instant::now();
        for (i, dir) in dirs.iter_mut().enumerate() {
            while dir.queue.front().is_some_and(|p| p.0 <= now) {
                let (_, pkt) = dir.queue.pop_front().unwrap();
                // SAFETY: writing a whole packet from a live buffer.
                let w = unsafe { libc::write(pfds[1 - i].fd, pkt.as_ptr().cast(), pkt.len()) };
                if w == pkt.len() as isize {
                    dir.count.packets += 1;
                    dir.count.bytes += pkt.len() as u64;
                } else {
                    dir.count.write_errors += 1;
                }
            }
        }
    }
    for (i, d) in dirs.iter().enumerate() {
        let (from, to) = if i == 0 { (a, b) } else { (b, a) };
        eprintln!(
            "delayline: {from} -> {to}: {} packets, {} bytes, {} write errors, at most {} held, {} left",
            d.count.packets,
            d.count.bytes,
            d.count.write_errors,
            d.count.max_queued,
            d.queue.len()
        );
    }
}
