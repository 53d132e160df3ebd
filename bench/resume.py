#!/usr/bin/env python3
"""Resume after an interruption, measured: a file (1 GiB by default) is sent over loopback, the
sender is killed (SIGKILL) once the receiver's hidden partial holds half of it, and the same file
is sent again. Prints the offset the second send resumed at, the bytes it moved, and its time;
then checks the stored file against the source with cmp.

    python3 bench/resume.py [--size-mib 1024] [--cut 0.5] [--dest-dir /dev/shm] [--no-build]

The digest cache is warm for the second send (as it is for a user retrying), so its time is the
resume itself: the receiver re-hashes the partial's prefix, then the rest crosses the wire.
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "xfer"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--cut", type=float, default=0.5, help="fraction of the file received before the kill")
    ap.add_argument("--dest-dir", default="/dev/shm", help="where the source and received files live")
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    size = args.size_mib << 20
    work = Path(tempfile.mkdtemp(prefix="xfer-resume-", dir=args.dest_dir))
    src, dst, cache = work / "src.bin", work / "dst", work / "cache"
    dst.mkdir()
    with open(src, "wb") as f:
        for _ in range(args.size_mib):
            f.write(os.urandom(1 << 20))
    env = dict(os.environ, XDG_CACHE_HOME=str(cache))
    rx = subprocess.Popen([BIN, "recv", "--dir", dst, "--listen", "127.0.0.1:0", "--quiet"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        addr = rx.stdout.readline().split()[-1]
        tx = subprocess.Popen([BIN, "send", src, addr, "--quiet"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env)
        want = int(size * args.cut)
        held = 0
        deadline = time.time() + 300
        while held < want:
            parts = list(dst.glob(".xfer-*.part"))
            held = parts[0].stat().st_size if parts else 0
            if tx.poll() is not None or time.time() > deadline:
                sys.exit(f"the first send ended before the cut (partial {held} bytes)")
            time.sleep(0.005)
        tx.send_signal(signal.SIGKILL)
        tx.wait()
        time.sleep(0.3)  # the receiver notices the reset and keeps the partial
        held = list(dst.glob(".xfer-*.part"))[0].stat().st_size
        start = time.monotonic()
        again = subprocess.run([BIN, "send", src, addr, "--quiet"], capture_output=True, text=True, env=env)
        elapsed = time.monotonic() - start
        if again.returncode != 0:
            sys.exit(f"the second send failed ({again.returncode}): {again.stdout}{again.stderr}")
        m = re.search(r"resumed at (\d+) bytes", again.stdout)
        offset = int(m.group(1)) if m else 0
        same = subprocess.run(["cmp", src, dst / "src.bin"]).returncode == 0
        print(f"file {size} bytes; sender killed with {held} bytes in the partial ({held / size:.1%})")
        print(f"second send: resumed at {offset} bytes, moved {size - offset} bytes "
              f"({(size - offset) / size:.1%} of the file) in {elapsed:.2f} s; stored file identical: {same}")
        print(f"sender said: {again.stdout.strip()}")
        if not same or offset == 0:
            sys.exit(1)
    finally:
        rx.terminate()
        rx.wait()
        subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    main()
