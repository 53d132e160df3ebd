#!/usr/bin/env python3
"""xfer on a real-rate link: two network namespaces joined by a veth pair, each end shaped with
`tc qdisc ... tbf rate 1gbit`, and a 1 GiB file sent across with xfer (SHA-256 and BLAKE3, first
sends, no cache) and with nc as the reference. Needs root (ip netns, tc). Cleans up after itself.

    sudo python3 bench/link.py [--rate 1gbit] [--size-mib 1024] [--reps 3] [--no-build]

Reports medians and the goodput as a share of the nominal link rate and of nc's on the same link.
With a 1500-byte MTU, TCP can carry at most 1448 payload bytes per 1514-byte frame that tbf
counts, 95.6 % of the rate: that is the ceiling for any tool here.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "xfer"
NS_TX, NS_RX = "xfer-bench-tx", "xfer-bench-rx"
IP_TX, IP_RX = "10.231.0.1", "10.231.0.2"


def sh(*args, check=True, **kw):
    return subprocess.run([str(a) for a in args], check=check, **kw)


def setup(rate):
    teardown()
    sh("ip", "netns", "add", NS_TX)
    sh("ip", "netns", "add", NS_RX)
    sh("ip", "link", "add", "xfb-tx", "type", "veth", "peer", "name", "xfb-rx")
    sh("ip", "link", "set", "xfb-tx", "netns", NS_TX)
    sh("ip", "link", "set", "xfb-rx", "netns", NS_RX)
    for ns, dev, ip in ((NS_TX, "xfb-tx", IP_TX), (NS_RX, "xfb-rx", IP_RX)):
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        # A token bucket at the link rate on each end: the data direction and the ACKs.
        sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "256kb",
           "latency", "50ms")


def teardown():
    for ns in (NS_TX, NS_RX):
        sh("ip", "netns", "del", ns, check=False, stderr=subprocess.DEVNULL)


def rate_bytes(rate):
    units = {"kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8}
    for u, f in units.items():
        if rate.endswith(u):
            return float(rate[: -len(u)]) * f
    sys.exit(f"cannot read rate {rate!r}")


def run_case(case, src, dst, port, size):
    """Returns wall seconds of one transfer of `src` from NS_TX to NS_RX (receiver started first)."""
    for f in dst.iterdir():
        f.unlink()
    cache = dst.parent / "cache"
    env = dict(os.environ, XDG_CACHE_HOME=str(cache))
    if case == "nc":
        rx = subprocess.Popen(["ip", "netns", "exec", NS_RX, "sh", "-c",
                               f"nc -l -d {IP_RX} {port} > {dst / 'f.bin'}"])
        tx_cmd = ["ip", "netns", "exec", NS_TX, "sh", "-c", f"nc -N {IP_RX} {port} < {src}"]
    else:
        hash_alg = case.split("-")[1]
        rx = subprocess.Popen(["ip", "netns", "exec", NS_RX, BIN, "recv", "--dir", dst, "--listen",
                               f"{IP_RX}:{port}", "--once", "--quiet"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=env)
        tx_cmd = ["ip", "netns", "exec", NS_TX, BIN, "send", src, f"{IP_RX}:{port}", "--quiet", "--no-cache",
                  "--hash", hash_alg]
    time.sleep(0.3)
    start = time.monotonic()
    tx = subprocess.run([str(a) for a in tx_cmd], env=env, stdout=subprocess.DEVNULL)
    rx.wait(timeout=600)
    elapsed = time.monotonic() - start
    got = (dst / "f.bin").stat().st_size if case == "nc" else (dst / src.name).stat().st_size
    if tx.returncode != 0 or rx.returncode != 0 or got != size:
        sys.exit(f"{case}: failed (sender {tx.returncode}, receiver {rx.returncode}, {got} of {size} bytes)")
    return elapsed


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", default="1gbit")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (ip netns, tc)")
    if not args.no_build:
        sh("cargo", "build", "--release", "--quiet", cwd=ROOT)
    size = args.size_mib << 20
    work = Path(tempfile.mkdtemp(prefix="xfer-link-", dir="/dev/shm"))
    src, dst = work / "f.bin", work / "dst"
    dst.mkdir()
    with open(src, "wb") as f:
        for _ in range(args.size_mib):
            f.write(os.urandom(1 << 20))
    cases = ["nc", "xfer-sha256", "xfer-blake3"]
    times = {c: [] for c in cases}
    try:
        setup(args.rate)
        port = 9400
        for rep in range(args.reps):
            for c in cases:  # interleaved
                port += 1
                t = run_case(c, src, dst, port, size)
                times[c].append(t)
                print(f"  rep {rep + 1} {c:12} {t:6.2f} s  {size / t / 1e6:7.1f} MB/s", flush=True)
    finally:
        teardown()
        sh("rm", "-rf", work)
    link = rate_bytes(args.rate)
    nc_med = statistics.median(times["nc"])
    print(f"\n{args.size_mib} MiB over veth shaped to {args.rate} ({link / 1e6:.0f} MB/s), medians of {args.reps}:")
    print(f"{'case':14} {'median s':>9} {'MB/s':>8} {'of link':>8} {'of nc':>7}")
    rows = []
    for c in cases:
        m = statistics.median(times[c])
        rows.append({"case": c, "median_s": m, "runs_s": times[c], "mb_per_s": size / m / 1e6,
                     "share_of_link": size / m / link, "share_of_nc": nc_med / m})
        print(f"{c:14} {m:9.2f} {size / m / 1e6:8.1f} {size / m / link:8.1%} {nc_med / m:7.1%}")
    out = ROOT / "bench" / "results" / f"{time.strftime('%Y-%m-%dT%H%M%S')}-{platform.node()}-link.json"
    out.write_text(json.dumps({"rate": args.rate, "size": size, "reps": args.reps, "rows": rows}, indent=1))
    print(f"raw results: {out}")


if __name__ == "__main__":
    main()
