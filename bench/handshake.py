#!/usr/bin/env python3
"""What the secure channel's handshake costs per send: N sends of a 1-byte file to one receiver,
with a code (first contact every time: the receiver does not --remember), with a pinned key
(paired once, then no code), and --insecure, in that order after one warm-up round of each.
Sender CPU comes from wait4() of each send, the receiver's from /proc/PID/stat before and after.

    cargo build --release && python3 bench/handshake.py target/release/xfer 200
"""
import os
import subprocess
import sys
import tempfile
import time

TICK = os.sysconf("SC_CLK_TCK")


def receiver_cpu(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def run(xfer, mode, n):
    work = tempfile.mkdtemp(prefix="xfer-hs-")
    dest = os.path.join(work, "dest")
    os.mkdir(dest)
    env = dict(os.environ, XDG_CONFIG_HOME=os.path.join(work, "config"), XDG_CACHE_HOME=os.path.join(work, "cache"))
    env.pop("XFER_CODE", None)
    src = os.path.join(work, "one")
    with open(src, "wb") as f:
        f.write(b"x")
    code = os.path.join(work, "code")
    recv = [xfer, "recv", "--dir", dest, "--listen", "127.0.0.1:0", "--quiet"]
    send_extra = []
    if mode == "insecure":
        recv.append("--insecure")
        send_extra.append("--insecure")
    else:
        recv += ["--code-file", code]
        send_extra += ["--code-file", code]
        if mode == "pinned":
            recv.append("--remember")
    r = subprocess.Popen(recv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    addr = r.stdout.readline().decode().split()[-1]
    if mode == "pinned":  # pair once; the timed sends use the pinned key and no code
        subprocess.run([xfer, "send", src, addr, "--quiet", *send_extra], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        send_extra = []
    start_cpu, sender_cpu, t0 = receiver_cpu(r.pid), 0.0, time.time()
    for _ in range(n):
        stored = os.path.join(dest, "one")
        if os.path.exists(stored):
            os.unlink(stored)
        p = subprocess.Popen([xfer, "send", src, addr, "--quiet", "--no-cache", *send_extra], env=env,
                             stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(p.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"{mode}: a send failed")
        sender_cpu += usage.ru_utime + usage.ru_stime
    wall, recv_cpu = time.time() - t0, receiver_cpu(r.pid) - start_cpu
    r.kill()
    return sender_cpu / n * 1e3, recv_cpu / n * 1e3, wall / n * 1e3


def main():
    xfer, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 200
    modes = ("insecure", "code", "pinned")
    for m in modes:  # warm-up: page cache, first key generation
        run(xfer, m, 5)
    out = {m: run(xfer, m, n) for m in modes}
    for m, (s, r, w) in out.items():
        print(f"{m:9s} sender {s:.2f} ms  receiver {r:.2f} ms  wall {w:.2f} ms  per send (n={n})")
    base = out["insecure"]
    for m in ("code", "pinned"):
        s, r, w = out[m]
        print(f"{m}: handshake adds {s - base[0]:+.2f} ms sender CPU, {r - base[1]:+.2f} ms receiver CPU, "
              f"{w - base[2]:+.2f} ms wall (target: <= 2 ms CPU per side)")


if __name__ == "__main__":
    main()
