#!/usr/bin/env python3
"""xfer on a real-rate, real-delay link: two network namespaces joined either by a veth pair
(no delay) or by the delay line (bench/delayline.rs: two TUN devices, one per namespace, and a
program that holds every packet for half the RTT in each direction), each end shaped with
`tc qdisc ... tbf`. A file is sent across with xfer, nc, an rsync daemon and scp to a private
sshd, interleaved; wall time and user+sys CPU of each side are recorded. Needs root (ip netns, tc,
/dev/net/tun). Cleans up after itself.

The xfer cases are named [insecure:][N:]xfer: encrypted (the default) or --insecure, with
--streams N (1 to 8) or auto (no N). The default set compares, on the same link:

    xfer            encrypted, --streams auto (the default: a connection per 20 ms of round trip)
    1:xfer          encrypted, --streams 1 (one TCP stream: the baseline for the lanes)
    8:xfer          encrypted, --streams 8 (the most)
    insecure:xfer   --insecure, --streams auto

For each xfer run the receiver's lanes are counted (its log lines "NAME (a lane)"): the streams
used are those lanes + the main connection.

    python3 bench/link.py                          # 1 Gbit/s over veth, no delay
    python3 bench/link.py --rate 1gbit --rtt 50    # 1 Gbit/s, 50 ms round trip (delay line)
    python3 bench/link.py --matrix                 # the issue's four links (1 Gbit/s at 20, 50,
                                                   # 100 ms; 100 Mbit/s at 100 ms with 256 MiB)
    python3 bench/link.py --ceiling                # the delay line's own ceiling (nc only)
    python3 bench/link.py --links 1gbit/100,100mbit/100/256 --tools nc,xfer --reps 5
    python3 bench/link.py --links 1gbit/50 --tools 1:xfer,2:xfer,4:xfer,xfer,insecure:1:xfer

Per link it prints the namespaces' TCP buffer limits, checks the delay line with ping (the
measured RTT must be the configured one within 1 ms), and does the window / RTT arithmetic: one
TCP stream moves at most one window per round trip. See bench/README.md ("Long fat link").
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NS_TX, NS_RX = "xfer-bench-tx", "xfer-bench-rx"
DEV_TX, DEV_RX = "xfb-tx", "xfb-rx"
IP_TX, IP_RX = "10.231.0.1", "10.231.0.2"
CASES = ("xfer", "1:xfer", "8:xfer", "insecure:xfer", "nc", "rsync", "scp")
MAX_STREAMS = 8  # xfer's MAX_LANES (src/protocol)
MATRIX = "1gbit/20,1gbit/50,1gbit/100,100mbit/100/256"
CEILING = "1gbit/veth,1gbit/0,none/veth,none/0"
TCP_OVERHEAD = 52  # IPv4 20 + TCP 20 + timestamps 12: payload per packet is MTU - 52
STATE = {"delayline": None, "kids": set()}


def sh(*args, check=True, **kw):
    return subprocess.run([str(a) for a in args], check=check, **kw)


def ns_exec(ns, *cmd):
    # `ip netns exec` execs the command in place: its pid is the command's, so wait4 on it gives
    # the command's own rusage (and that of the children it reaped).
    return ["ip", "netns", "exec", ns, *map(str, cmd)]


def rate_bytes(rate):
    """Bytes per second of a tc rate ("1gbit", "100mbit"); None for "none" (no shaping)."""
    if rate == "none":
        return None
    units = {"kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8}
    for u, f in units.items():
        if rate.endswith(u):
            return float(rate[: -len(u)]) * f
    sys.exit(f"cannot read rate {rate!r} (e.g. 1gbit, 100mbit, none)")


def parse_links(text, size_mib):
    """RATE/RTT[/MIB],...: RTT in ms through the delay line, or "veth" (no delay line)."""
    links = []
    for spec in text.split(","):
        parts = spec.strip().split("/")
        if len(parts) not in (2, 3):
            sys.exit(f"bad link {spec!r}: RATE/RTT_MS[/MIB], e.g. 1gbit/50 or 100mbit/100/256")
        rate_bytes(parts[0])
        rtt = None if parts[1] == "veth" else float(parts[1])
        links.append({"rate": parts[0], "rtt_ms": rtt, "size_mib": int(parts[2]) if len(parts) == 3 else size_mib,
                      "name": f"{parts[0]}/{'veth' if rtt is None else f'{parts[1]}ms'}"})
    return links


def xfer_case(case):
    """(insecure, streams) of an xfer case "[insecure:][N:]xfer" (streams "auto" or "1".."8");
    None for another tool; exits on a malformed one."""
    *prefixes, tool = case.split(":")
    if tool != "xfer":
        return None
    insecure = "insecure" in prefixes
    streams = [p for p in prefixes if p != "insecure"]
    if len(prefixes) > 2 or prefixes.count("insecure") > 1 or len(streams) > 1 or \
            (streams and not (streams[0] == "auto" or streams[0].isdigit() and 1 <= int(streams[0]) <= MAX_STREAMS)):
        sys.exit(f"bad xfer case {case!r}: [insecure:][N:]xfer with N of 1-{MAX_STREAMS} or auto")
    return insecure, (streams[0] if streams else "auto")


def describe(case):
    """A case as the chart's legend says it."""
    x = xfer_case(case)
    if x is None:
        return {"nc": "nc (netcat-openbsd)", "rsync": "rsync daemon", "scp": "scp (private sshd)"}.get(case, case)
    insecure, streams = x
    return f"xfer{' --insecure' if insecure else ''}, --streams {streams}"


# ---------------------------------------------------------------- processes

def start(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=None, env=None):
    p = subprocess.Popen(cmd, stdin=stdin, stdout=stdout, stderr=stderr, env=env)
    STATE["kids"].add(p.pid)
    return p


def rx_bytes(pid):
    """Bytes received by DEV_RX, read in pid's network namespace (/proc/PID/net/dev)."""
    try:
        for line in Path(f"/proc/{pid}/net/dev").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name.strip() == DEV_RX:
                return int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return None


def reap(p, timeout=None, sample=None):
    """(exit code, user+sys CPU seconds) of p, its own and that of the children it reaped.
    sample: (pid in NS_RX, list): appends (time, DEV_RX bytes) every 0.1 s while waiting."""
    deadline = None if timeout is None else time.monotonic() + timeout
    last = 0.0
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG if deadline else 0)
        if pid:
            break
        if sample and time.monotonic() - last >= 0.1:
            last = time.monotonic()
            if (b := rx_bytes(sample[0])) is not None:
                sample[1].append((time.perf_counter(), b))
        if time.monotonic() > deadline:
            kill_tree(p.pid)
            raise RuntimeError(f"{p.args[3:5]} still running after {timeout:.0f} s: killed")
        time.sleep(0.005)
    STATE["kids"].discard(p.pid)
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, ru.ru_utime + ru.ru_stime


def descendants(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                kids = [int(c) for c in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
                out += kids
                todo += kids
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def kill_tree(pid):
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def listening(pid, ip, port):
    """Is something listening on ip:port in pid's network namespace (its /proc/PID/net/tcp)?"""
    want = f"{socket.inet_aton(ip)[::-1].hex().upper()}:{port:04X}"
    try:
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except FileNotFoundError:
        return False
    return any(f[1] == want and f[3] == "0A" for f in (line.split() for line in lines))


def wait_listening(p, ip, port, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not listening(p.pid, ip, port):
        if p.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{p.args[3]} is not listening on {ip}:{port}")
        time.sleep(0.005)


# ---------------------------------------------------------------- the link

def setup(link, args):
    teardown()
    for ns in (NS_TX, NS_RX):
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    if link["rtt_ms"] is None:
        sh("ip", "link", "add", DEV_TX, "type", "veth", "peer", "name", DEV_RX)
        sh("ip", "link", "set", DEV_TX, "netns", NS_TX)
        sh("ip", "link", "set", DEV_RX, "netns", NS_RX)
    else:
        cmd = [ROOT / "target" / "release" / "examples" / "delayline", f"{NS_TX}:{DEV_TX}", f"{NS_RX}:{DEV_RX}",
               "--delay-us", round(link["rtt_ms"] * 500), *(["--offload"] if args.offload else [])]
        # The delay line stands for the network: at nice -10 a busy machine (builds at nice 0)
        # delays its packets less. It still shares the two cores with the endpoints.
        dl = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: os.nice(-10))
        STATE["delayline"] = dl
        if dl.stdout.readline().strip() != "ready":
            dl.wait()
            sys.exit(f"delay line did not start: {dl.stderr.read().strip()}")
    for ns, dev, ip in ((NS_TX, DEV_TX, IP_TX), (NS_RX, DEV_RX, IP_RX)):
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
        # A TUN device's ring holds txqueuelen packets and drops past that: room for bursts.
        sh("ip", "-n", ns, "link", "set", dev, "mtu", args.mtu, "txqueuelen", 10000, "up")
        if link["rate"] != "none":
            # A token bucket at the link rate on each end: the data direction and the ACKs.
            sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", link["rate"], "burst", "256kb",
               "latency", "50ms")
        if args.tcp_wmem_max:
            low, default, _ = Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()
            sh(*ns_exec(ns, "sysctl", "-q", "-w", f"net.ipv4.tcp_wmem={low} {default} {args.tcp_wmem_max}"))


def teardown():
    """Stops the delay line (its TUN devices go with it) and deletes the namespaces. Returns the
    delay line's CPU seconds and its counters (None without one)."""
    dl, STATE["delayline"] = STATE["delayline"], None
    out = None
    if dl is not None:
        dl.send_signal(signal.SIGTERM)
        try:
            _, status, ru = os.wait4(dl.pid, 0)
            out = {"cpu_s": ru.ru_utime + ru.ru_stime, "counters": dl.stderr.read().strip().splitlines()}
        except ChildProcessError:
            pass
    for ns in (NS_TX, NS_RX):
        sh("ip", "netns", "del", ns, check=False, stderr=subprocess.DEVNULL)
    return out


def ns_sysctls(ns):
    keys = ("net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem", "net.core.rmem_max", "net.core.wmem_max",
            "net.ipv4.tcp_congestion_control")
    out = {}
    for k in keys:
        r = sh(*ns_exec(ns, "cat", "/proc/sys/" + k.replace(".", "/")), capture_output=True, text=True)
        out[k] = r.stdout.split() if "mem" in k and "max" not in k else r.stdout.strip()
    return out


def ping_rtt(count=20):
    """Round trips of `count` pings across the link (ms): min, median, max. The median is what is
    checked: on a loaded machine a ping now and then waits for a CPU (the delay line's or the
    namespaces' softirq) and comes back late."""
    r = sh(*ns_exec(NS_TX, "ping", "-c", count, "-i", "0.2", IP_RX), capture_output=True, text=True)
    times = [float(t) for t in re.findall(r"time=([\d.]+) ms", r.stdout)]
    if len(times) < count // 2:
        sys.exit(f"ping across the link failed: {r.stdout} {r.stderr}")
    out = {"min": min(times), "median": statistics.median(times), "max": max(times), "n": len(times)}
    # ping prints whole ms from 100 ms up; its summary line has the exact min/avg/max/mdev.
    if m := re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms", r.stdout):
        out.update(min=float(m[1]), avg=float(m[2]), max=float(m[3]), mdev=float(m[4]))
    return out


def arithmetic(link, sysctl, mtu, veth):
    """The ceiling of one TCP stream on this link: min(goodput, window / RTT)."""
    payload = mtu - TCP_OVERHEAD
    wire = mtu + (14 if veth else 0)  # tbf counts what the device sends: an Ethernet frame on veth,
    rate = rate_bytes(link["rate"])   # the bare IP packet on a TUN device
    goodput = rate * payload / wire if rate else None
    wmem, rmem = int(sysctl[NS_TX]["net.ipv4.tcp_wmem"][2]), int(sysctl[NS_RX]["net.ipv4.tcp_rmem"][2])
    out = {"payload_share": payload / wire, "goodput_Bps": goodput, "tcp_wmem_max": wmem, "tcp_rmem_max": rmem}
    rtt = (link["rtt_ms"] or 0) / 1e3
    if rtt and goodput:
        # Sender: the send buffer (tcp_wmem max) holds everything unacknowledged, and a writer that
        # waits for POLLOUT is only woken once no more than 2/3 of it is queued. Receiver: the
        # advertised window is about half of tcp_rmem max (the rest is skb overhead).
        window_lo, window_hi = wmem * 2 / 3, min(wmem, rmem / 2)
        out.update(bdp_bytes=goodput * rtt, window_lo=window_lo, window_hi=window_hi,
                   stream_lo_Bps=min(goodput, window_lo / rtt), stream_hi_Bps=min(goodput, window_hi / rtt))
    return out


def print_arithmetic(link, a, sysctl):
    for ns in (NS_TX, NS_RX):
        s = sysctl[ns]
        print(f"  {ns}: tcp_rmem {' '.join(s['net.ipv4.tcp_rmem'])}, tcp_wmem {' '.join(s['net.ipv4.tcp_wmem'])}, "
              f"rmem_max {s['net.core.rmem_max']}, wmem_max {s['net.core.wmem_max']}, "
              f"{s['net.ipv4.tcp_congestion_control']}")
    if a["goodput_Bps"]:
        print(f"  goodput ceiling: {link['rate']} x {a['payload_share']:.3f} (payload per packet as tbf counts it) "
              f"= {a['goodput_Bps'] / 1e6:.1f} MB/s")
    if "bdp_bytes" in a:
        rtt = link["rtt_ms"] / 1e3
        print(f"  bandwidth x delay: {a['goodput_Bps'] / 1e6:.1f} MB/s x {rtt * 1e3:.0f} ms = {a['bdp_bytes'] / 1e6:.2f} MB "
              f"in flight needed")
        print(f"  window: sender tcp_wmem max {a['tcp_wmem_max'] / 1e6:.2f} MB (a POLLOUT writer keeps 2/3 of it "
              f"queued: {a['window_lo'] / 1e6:.2f} MB); receiver ~ tcp_rmem max / 2 = {a['tcp_rmem_max'] / 2e6:.2f} MB")
        print(f"  one stream <= min(goodput, window / RTT) = {a['stream_lo_Bps'] / 1e6:.1f} .. "
              f"{a['stream_hi_Bps'] / 1e6:.1f} MB/s ({a['stream_lo_Bps'] / a['goodput_Bps']:.0%} .. "
              f"{a['stream_hi_Bps'] / a['goodput_Bps']:.0%} of the link)")


# ---------------------------------------------------------------- cases

def ensure_peers(tools):
    want = {"nc": ("netcat-openbsd", "nc.openbsd"), "rsync": ("rsync", "rsync"),
            "scp": ("openssh-server openssh-client", "sshd")}
    need = [pkg for t, (pkg, exe) in want.items() if t in tools and not shutil.which(exe)]
    if not shutil.which("ping"):
        need.append("iputils-ping")
    if need:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        print(f"installing {' '.join(need)} with apt-get ...", flush=True)
        sh("apt-get", "update", "-qq", env=env, stdout=subprocess.DEVNULL)
        sh("apt-get", "install", "-y", "-qq", "--no-install-recommends", *" ".join(need).split(), env=env,
           stdout=subprocess.DEVNULL)


def setup_peers(ctx):
    ctx["rsyncd_conf"] = ctx["work"] / "rsyncd.conf"
    ctx["rsyncd_conf"].write_text(f"pid file = {ctx['work']}/rsyncd.pid\nuse chroot = no\n"
                                  f"[dst]\npath = {ctx['dst']}\nread only = no\nuid = root\ngid = root\n")
    # A private sshd as in bench/run.py: its own host key, authorized key and config in the work dir.
    d = ctx["work"] / "ssh"
    d.mkdir(mode=0o700)
    for name in ("host_ed25519", "id_ed25519"):
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"xfer-bench-{name}", "-f", d / name)
    (d / "authorized_keys").write_text((d / "id_ed25519.pub").read_text())
    ctx["sshd_conf"] = d / "sshd_config"
    ctx["sshd_conf"].write_text("\n".join([
        f"HostKey {d}/host_ed25519", f"PidFile {d}/sshd.pid", f"AuthorizedKeysFile {d}/authorized_keys",
        "PermitRootLogin prohibit-password", "PubkeyAuthentication yes", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", "UseDNS no", "PrintMotd no",
        "X11Forwarding no", "AllowTcpForwarding no", "LogLevel ERROR",
        "Subsystem sftp /usr/lib/openssh/sftp-server", ""]))
    ctx["ssh_opts"] = ["-i", d / "id_ed25519", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                       "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]
    ctx["made_run_sshd"] = not os.path.exists("/run/sshd")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    # xfer's keys, pins and digest cache live in the work dir; the code is the one the first
    # receiver writes there (--code-file); XFER_CODE from the caller is not used.
    os.environ.pop("XFER_CODE", None)
    ctx["code"] = ctx["work"] / "code"
    ctx["env"] = {side: dict(os.environ, XDG_CACHE_HOME=str(ctx["work"] / "cache"),
                             XDG_CONFIG_HOME=str(ctx["work"] / f"config-{side}")) for side in ("send", "recv")}


def run_case(case, ctx, src, port, timeout):
    """One transfer of src from NS_TX to NS_RX; returns wall seconds and each side's CPU seconds."""
    for f in ctx["dst"].iterdir():
        f.unlink()
    log = open(ctx["work"] / "last.log", "w")
    rx_log_path = ctx["work"] / "recv.log"
    rx_log = open(rx_log_path, "w")  # the xfer receiver's own stderr: its lane lines are counted
    xfer = str(ROOT / "target" / "release" / "xfer")
    daemon = None
    if case == "nc":
        rx = start(ns_exec(NS_RX, "nc.openbsd", "-l", "-d", IP_RX, port), stdout=open(ctx["dst"] / src.name, "wb"),
                   stderr=log)
        wait_listening(rx, IP_RX, port)
        tx_cmd, tx_in, env = ns_exec(NS_TX, "nc.openbsd", "-N", IP_RX, port), open(src, "rb"), None
    elif xfer_case(case):
        insecure, streams = xfer_case(case)
        mode = ["--insecure"] if insecure else ["--code-file", ctx["code"]]
        out = ctx["work"] / "recv.out"
        rx = start(ns_exec(NS_RX, xfer, "recv", "--dir", ctx["dst"], "--listen", f"{IP_RX}:{port}", "--once",
                           "--quiet", *mode), stdout=open(out, "wb"), stderr=rx_log, env=ctx["env"]["recv"])
        deadline = time.monotonic() + 10
        while b"listening on" not in out.read_bytes():
            if rx.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"xfer recv did not start: {rx_log_path.read_text()}")
            time.sleep(0.005)
        tx_cmd = ns_exec(NS_TX, xfer, "send", src, f"{IP_RX}:{port}", "--quiet", "--no-cache", "--streams", streams,
                         *mode)
        tx_in, env = subprocess.DEVNULL, ctx["env"]["send"]
    elif case == "rsync":
        daemon = start(ns_exec(NS_RX, "rsync", "--daemon", "--no-detach", f"--config={ctx['rsyncd_conf']}",
                               f"--address={IP_RX}", f"--port={port}"), stderr=log)
        wait_listening(daemon, IP_RX, port)
        tx_cmd = ns_exec(NS_TX, "rsync", "-a", "--whole-file", src, f"rsync://{IP_RX}:{port}/dst/")
        tx_in, env = subprocess.DEVNULL, None
    elif case == "scp":
        daemon = start(ns_exec(NS_RX, shutil.which("sshd") or "/usr/sbin/sshd", "-D", "-e", "-f", ctx["sshd_conf"],
                               "-o", f"ListenAddress={IP_RX}:{port}"), stderr=log)
        wait_listening(daemon, IP_RX, port)
        tx_cmd = ns_exec(NS_TX, "scp", "-q", "-P", port, *ctx["ssh_opts"], src, f"root@{IP_RX}:{ctx['dst']}/")
        tx_in, env = subprocess.DEVNULL, None
    else:
        raise ValueError(case)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    tx = start(tx_cmd, stdin=tx_in, stderr=log, env=env)
    samples = []
    rc_tx, cpu_tx = reap(tx, timeout, sample=((daemon or rx).pid, samples))
    if daemon is None:
        rc_rx, cpu_rx = reap(rx, max(1.0, timeout - (time.perf_counter() - t0)))
        wall = time.perf_counter() - t0
    else:
        # The run ends when the daemon's child for the connection (the receiver) has exited too;
        # stopping the daemon then hands us the CPU of the children it reaped.
        while descendants(daemon.pid) and time.perf_counter() - t0 < timeout:
            time.sleep(0.001)
        wall = time.perf_counter() - t0
        daemon.send_signal(signal.SIGTERM)
        rc_rx, cpu_rx = reap(daemon, 10)
        rc_rx = 0
    got = (ctx["dst"] / src.name).stat().st_size if (ctx["dst"] / src.name).exists() else 0
    rx_text = rx_log_path.read_text()
    if rc_tx or rc_rx or got != src.stat().st_size:
        raise RuntimeError(f"{case}: failed (sender {rc_tx}, receiver {rc_rx}, {got} of {src.stat().st_size} bytes): "
                           f"{((ctx['work'] / 'last.log').read_text() + rx_text)[-500:]}")
    out = {"wall_s": wall, "cpu_send_s": cpu_tx, "cpu_recv_s": cpu_rx, "load1": load, "steady_Bps": steady(samples)}
    if xfer_case(case):
        # One receiver line per lane that joined: '... "NAME (a lane)": 24.0 MiB received in ...'.
        lanes = [line for line in rx_text.splitlines() if "(a lane)" in line]
        out["lanes"] = len(lanes)
        out["streams_used"] = len(lanes) + 1  # the lanes and the main connection
        out["lane_mib"] = [lane_mib(line) for line in lanes]
        out["lane_failures"] = [line for line in lanes if "failed" in line]
    return out


def lane_mib(line):
    """MiB a lane carried, from its receiver line ('...: 24.0 MiB received in ...'); 0 for 'nothing'."""
    m = re.search(r": ([\d.]+) (B|KiB|MiB|GiB|TiB) received", line)
    if not m:
        return 0.0
    return float(m[1]) * 1024 ** ("B KiB MiB GiB TiB".split().index(m[2])) / (1 << 20)


def steady(samples):
    """The data direction's rate (bytes on the wire per second, as DEV_RX received them) over the
    middle half of the transfer: from 25 % to 75 % of the bytes, past slow start and the tail."""
    if len(samples) < 5:
        return None
    total = samples[-1][1] - samples[0][1]
    a = next(s for s in samples if s[1] - samples[0][1] >= total / 4)
    b = next(s for s in samples if s[1] - samples[0][1] >= total * 3 / 4)
    return (b[1] - a[1]) / (b[0] - a[0]) if b[0] > a[0] else None


# ---------------------------------------------------------------- main

def summarize(link, runs, tools):
    size = link["size_mib"] << 20
    rows = []
    nc = statistics.median(r["wall_s"] for r in runs["nc"]) if runs.get("nc") else None
    for c in tools:
        if not runs.get(c):
            continue
        med = lambda k: statistics.median(r[k] for r in runs[c])
        m = med("wall_s")
        row = {"case": c, "n": len(runs[c]), "median_s": m, "runs_s": [r["wall_s"] for r in runs[c]],
               "mb_per_s": size / m / 1e6, "cpu_send_s_per_gib": med("cpu_send_s") * (1 << 30) / size,
               "cpu_recv_s_per_gib": med("cpu_recv_s") * (1 << 30) / size}
        st = [r["steady_Bps"] for r in runs[c] if r.get("steady_Bps")]
        if st:
            # Wire bytes to payload: each packet of MTU bytes carries MTU - 52 (as tbf counts it, on TUN).
            row["steady_mb_per_s"] = statistics.median(st) * link["arith"]["payload_share"] / 1e6
        if link["arith"]["goodput_Bps"]:
            row["share_of_link"] = size / m / link["arith"]["goodput_Bps"]
        if nc:
            row["vs_nc"] = m / nc  # time ratio (< 1: faster than nc)
            row["rate_vs_nc"] = nc / m  # rate ratio (> 1: faster than nc)
        if (x := xfer_case(c)) is not None:
            used = sorted(r["streams_used"] for r in runs[c] if "streams_used" in r)
            row["streams"] = x[1]
            row["streams_used"] = used
            row["lane_failures"] = sum(len(r.get("lane_failures", [])) for r in runs[c])
            # Against one stream of the same mode in the same run: what the lanes gained.
            base = ("insecure:" if x[0] else "") + "1:xfer"
            if runs.get(base):
                row["rate_vs_1stream"] = statistics.median(r["wall_s"] for r in runs[base]) / m
        rows.append(row)
    return rows


def streams_text(row):
    """The streams a case used: "3", "2-3" when its runs differed; "1" for the other tools."""
    used = row.get("streams_used")
    if not used:
        return "1" if xfer_case(row["case"]) is None else "?"
    return str(used[0]) if used[0] == used[-1] else f"{used[0]}-{used[-1]}"


def verdict(link):
    """Does one TCP stream fill the link? From the best single-stream case measured (an xfer case
    that used lanes does not count); then what the lanes gained over one stream."""
    a, rows = link["arith"], link["rows"]
    single = [r for r in rows if max(r.get("streams_used") or [1]) == 1]
    if not a["goodput_Bps"] or not single:
        return None
    # Judged on the steady middle of the transfer (slow start and the handshakes excluded).
    rate = lambda r: r.get("steady_mb_per_s", r["mb_per_s"])
    best = max(single, key=rate)
    share = rate(best) * 1e6 / a["goodput_Bps"]
    fills = share >= 0.9
    text = (f"{link['name']}: one stream {'fills' if fills else 'does NOT fill'} the link: best {best['case']} "
            f"{rate(best):.1f} MB/s in the steady middle = {share:.0%} of {a['goodput_Bps'] / 1e6:.1f} MB/s "
            f"({best['mb_per_s']:.1f} MB/s over the whole transfer)")
    if not fills:
        text += (f"; N parallel streams could gain at most x{1 / share:.1f} (to the link), i.e. "
                 f"{int(-(-1 // share))} streams of this window")
    lanes = []
    for r in rows:
        if "rate_vs_1stream" in r and r["case"] not in ("1:xfer", "insecure:1:xfer"):
            lanes.append(f"{r['case']} ({streams_text(r)} streams) {r['mb_per_s']:.1f} MB/s = "
                         f"x{r['rate_vs_1stream']:.2f} one stream")
    if lanes:
        text += "; lanes: " + ", ".join(lanes)
    return {"fills": fills, "best_case": best["case"], "best_share": share, "max_gain": max(1.0, 1 / share),
            "lanes": lanes, "text": text}


def markdown(data):
    m = data["machine"]
    out = [f"# Long fat link: {data['date']} on {m['host']} ({m['cpu']}, {m['cores']} cores, kernel {m['kernel']})", "",
           f"`python3 bench/link.py {data['argv']}`; {data['reps']} reps per case, interleaved, medians; "
           f"MTU {data['mtu']}{', TUN offloads' if data['offload'] else ''}; CPU = user+sys per GiB of each side "
           f"(wait4 rusage, children included). Load (1 min) before each link in the table heading. "
           f"Cases: " + "; ".join(f"`{c}` = {describe(c)}" for c in data.get("tools", []) if xfer_case(c)) +
           ". Streams used: the lanes the receiver logged + the main connection (min-max over the runs); "
           "rate x nc and rate x 1 stream are ratios of median rates (> 1: faster), 1 stream = `1:xfer` "
           "(`insecure:1:xfer` for the insecure cases) of the same run.", ""]
    for link in data["links"]:
        a = link["arith"]
        head = f"## {link['name']}, {link['size_mib']} MiB (load {link['load_before']:.2f})"
        out += [head, ""]
        if link.get("ping"):
            p = link["ping"]
            mid = p.get("median", p.get("avg"))
            out.append(f"ping RTT median {mid:.2f} ms, min / avg / max {p['min']:.2f} / {p.get('avg', mid):.2f} / "
                       f"{p['max']:.2f} ms, "
                       f"configured {link['rtt_ms']:.0f} ms.")
        if "bdp_bytes" in a:
            out.append(f"Goodput ceiling {a['goodput_Bps'] / 1e6:.1f} MB/s; bandwidth x delay "
                       f"{a['bdp_bytes'] / 1e6:.2f} MB; window {a['window_lo'] / 1e6:.2f}-{a['window_hi'] / 1e6:.2f} MB "
                       f"(2/3 of, and all of, tcp_wmem max {a['tcp_wmem_max']}); one stream <= "
                       f"{a['stream_lo_Bps'] / 1e6:.1f}-{a['stream_hi_Bps'] / 1e6:.1f} MB/s.")
        out += ["", "| case | streams used | n | median s | MB/s | of link | steady MB/s | rate x nc | "
                "rate x 1 stream | CPU s/GiB send | CPU s/GiB recv |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in link["rows"]:
            share = f"{r['share_of_link']:.0%}" if "share_of_link" in r else ""
            vs = f"{r['rate_vs_nc']:.2f}" if "rate_vs_nc" in r else (f"{1 / r['vs_nc']:.2f}" if "vs_nc" in r else "")
            v1 = f"{r['rate_vs_1stream']:.2f}" if "rate_vs_1stream" in r else ""
            st = f"{r['steady_mb_per_s']:.1f}" if "steady_mb_per_s" in r else ""
            out.append(f"| {r['case']} | {streams_text(r)} | {r['n']} | {r['median_s']:.2f} | {r['mb_per_s']:.1f} | "
                       f"{share} | {st} | {vs} | {v1} | {r['cpu_send_s_per_gib']:.2f} | {r['cpu_recv_s_per_gib']:.2f} |")
        if fails := sum(r.get("lane_failures", 0) for r in link["rows"]):
            out.append(f"\n{fails} lane(s) logged a failure (their parts went over the other connections).")
        if link.get("delayline"):
            out.append(f"\nDelay line CPU for the whole link: {link['delayline']['cpu_s']:.1f} s.")
        if link.get("verdict"):
            out += ["", f"**{link['verdict']['text']}.**"]
        if link.get("errors"):
            out += ["", "Errors: " + "; ".join(link["errors"])]
        out.append("")
    return "\n".join(out)


def draw_chart(data, png):
    """One panel per link: each tool's mid-transfer rate (MB/s, median of its runs) as a bar, the
    link's goodput ceiling and one stream's window/RTT bound as lines. Works from the JSON alone
    (`--chart JSON`)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    links = [l for l in data["links"] if l.get("rows")]
    if not links:
        return None
    from matplotlib.patches import Patch
    width = max(7.0, 3.8 * len(links))
    fig, axes = plt.subplots(1, len(links), figsize=(width, 4.8), squeeze=False)
    # Blues for xfer: dark = auto (the default), light = one stream, purple = 8; the peers as before.
    colors = {"xfer": "#1f77b4", "1:xfer": "#aec7e8", "8:xfer": "#6a3d9a", "insecure:xfer": "#8c9fb3",
              "nc": "#ff7f0e", "rsync": "#2ca02c", "scp": "#d62728"}
    seen = {}
    for ax, link in zip(axes[0], links):
        rows = link["rows"]
        names = [r["case"] for r in rows]
        rates = [r.get("steady_mb_per_s") or r["mb_per_s"] for r in rows]
        ax.bar(range(len(rows)), rates, color=[colors.get(n, "#7f7f7f") for n in names])
        for i, r in enumerate(rows):
            seen.setdefault(r["case"], colors.get(r["case"], "#7f7f7f"))
            if r.get("streams_used"):  # the streams xfer used, inside the top of its bar
                c = colors.get(r["case"], "#7f7f7f")
                dark = sum(int(c[k:k + 2], 16) * w for k, w in ((1, 0.3), (3, 0.59), (5, 0.11))) < 140
                ax.annotate(f"x{streams_text(r)}", (i, rates[i]), xytext=(0, -3), textcoords="offset points",
                            ha="center", va="top", fontsize=8, color="white" if dark else "black")
        ax.set_xticks(range(len(rows)), names, rotation=45, ha="right", fontsize=8)
        arith = link.get("arith") or {}
        if arith.get("goodput_Bps"):
            ax.axhline(arith["goodput_Bps"] / 1e6, color="black", lw=1, ls="--", label="link goodput")
        if arith.get("stream_hi_Bps") and arith.get("goodput_Bps") and arith["stream_hi_Bps"] < arith["goodput_Bps"]:
            ax.axhspan(arith["stream_lo_Bps"] / 1e6, arith["stream_hi_Bps"] / 1e6, color="grey", alpha=0.2,
                       label="one stream: window / RTT")
        ax.set_title(link["name"], fontsize=10)
        ax.set_ylabel("MB/s (mid-transfer)")
        top = max(rates + [arith.get("goodput_Bps", 0) / 1e6])
        ax.set_ylim(0, top * 1.35)  # room for the legend above the bars
        ax.legend(fontsize=7, loc="upper center")
    m = data.get("machine") or {}
    fig.suptitle(f"xfer on shaped links with a round trip, {str(data.get('date', ''))[:16]}, "
                 f"{m.get('cpu', '')} ({m.get('cores', '?')} cores)\nxN in a bar: the TCP streams xfer used",
                 fontsize=9)
    fig.legend(handles=[Patch(color=c, label=f"{n}: {describe(n)}") for n, c in seen.items()], loc="lower center",
               ncol=max(1, min(len(seen), int(width // 3.4))), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--chart":
        src = Path(sys.argv[2])
        print(draw_chart(json.loads(src.read_text()), src.with_suffix(".png")))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", default="1gbit", help="tc rate of the link, or none (default 1gbit)")
    ap.add_argument("--rtt", type=float, default=0, help="round trip in ms through the delay line (0 = veth)")
    ap.add_argument("--links", help="RATE/RTT[/MIB],... (RTT in ms, or veth); overrides --rate/--rtt")
    ap.add_argument("--matrix", action="store_true", help=f"--links {MATRIX}")
    ap.add_argument("--ceiling", action="store_true", help=f"--links {CEILING} --tools nc")
    ap.add_argument("--tools", default=",".join(CASES),
                    help=f"comma-separated cases, run in this order (rotated per rep): nc, rsync, scp, and xfer as "
                         f"[insecure:][N:]xfer (--insecure; --streams N of 1-{MAX_STREAMS}, or auto without N); "
                         f"default {','.join(CASES)}")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--mtu", type=int, default=1500)
    ap.add_argument("--offload", action="store_true", help="TUN devices with IFF_VNET_HDR + TSO (64 KiB packets)")
    ap.add_argument("--tcp-wmem-max", type=int, help="set net.ipv4.tcp_wmem's max in both namespaces (bytes); "
                    "default: the kernel's, as a new namespace copies it from the host")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per transfer")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--out", help="JSON path (the .md goes beside it); default bench/results/DATE-HOST-link.json")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (ip netns, tc, /dev/net/tun)")
    tools = args.tools.split(",")
    if args.ceiling:
        spec, tools = CEILING, ["nc"]
    else:
        single = f"{args.rate}/{args.rtt:g}" if args.rtt else f"{args.rate}/veth"
        spec = MATRIX if args.matrix else (args.links or single)
    if bad := [t for t in tools if t not in ("nc", "rsync", "scp") and xfer_case(t) is None]:
        sys.exit(f"unknown tools {bad}: nc, rsync, scp or [insecure:][N:]xfer")
    links = parse_links(spec, args.size_mib)
    if not args.no_build:
        sh("cargo", "build", "--release", "--quiet", "--bin", "xfer", "--example", "delayline", cwd=ROOT)
    ensure_peers(tools)

    work = Path(tempfile.mkdtemp(prefix="xfer-link-", dir="/dev/shm"))
    ctx = {"work": work, "dst": work / "dst"}
    ctx["dst"].mkdir()
    date = datetime.datetime.now()
    data = {"date": date.isoformat(timespec="seconds"), "argv": " ".join(sys.argv[1:]), "reps": args.reps,
            "tcp_wmem_max": args.tcp_wmem_max,
            "mtu": args.mtu, "offload": args.offload, "tools": tools, "links": [],
            "machine": {"host": platform.node(), "kernel": platform.release(), "cores": os.cpu_count(),
                        "cpu": next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                     if line.startswith("model name")), "?")}}
    status = 0
    try:
        setup_peers(ctx)
        sources = {}
        port = 9400
        for link in links:
            if link["size_mib"] not in sources:
                sources[link["size_mib"]] = src = work / f"f{link['size_mib']}.bin"
                with open(src, "wb") as f:
                    for _ in range(link["size_mib"]):
                        f.write(os.urandom(1 << 20))
            src = sources[link["size_mib"]]
            link["load_before"] = os.getloadavg()[0]
            print(f"\n== {link['name']}, {link['size_mib']} MiB; uptime: {sh('uptime', capture_output=True, text=True).stdout.strip()}",
                  flush=True)
            setup(link, args)
            sysctl = {ns: ns_sysctls(ns) for ns in (NS_TX, NS_RX)}
            link["sysctl"] = sysctl
            link["arith"] = arithmetic(link, sysctl, args.mtu, link["rtt_ms"] is None)
            if link["rtt_ms"] is not None:
                link["ping"] = p = ping_rtt()
                ok = abs(p["median"] - link["rtt_ms"]) <= 1.0
                print(f"  ping: median {p['median']:.2f} ms (min/avg/max {p['min']:.2f}/{p.get('avg', 0):.2f}/"
                      f"{p['max']:.2f}) for a configured {link['rtt_ms']:g} ms: {'within' if ok else 'NOT within'} 1 ms"
                      + (" (ping shows whole ms from 100 ms up)" if p["median"] >= 100 else ""), flush=True)
                if not ok:
                    status = 1
            print_arithmetic(link, link["arith"], sysctl)
            if any(xfer_case(t) for t in tools) and not (work / "code").exists():
                # Pair once, untimed: makes the code file and both identity keys.
                hello = work / "hello.txt"
                hello.write_text("hello\n")
                run_case("xfer", ctx, hello, port, 60)
                port += 1
            runs, errors = {c: [] for c in tools}, []
            for rep in range(args.reps):
                order = tools[rep % len(tools):] + tools[:rep % len(tools)]  # rotate: none always first
                for c in order:
                    port += 1
                    try:
                        r = run_case(c, ctx, src, port, args.timeout)
                    except RuntimeError as e:
                        errors.append(f"rep {rep + 1} {c}: {e}")
                        print(f"  rep {rep + 1} {c:14} FAILED: {e}", flush=True)
                        status = 1
                        for pid in list(STATE["kids"]):
                            kill_tree(pid)
                            try:
                                os.waitpid(pid, 0)
                            except ChildProcessError:
                                pass
                            STATE["kids"].discard(pid)
                        continue
                    runs[c].append(r)
                    size = link["size_mib"] << 20
                    st = f" steady {r['steady_Bps'] * link['arith']['payload_share'] / 1e6:6.1f}" if r["steady_Bps"] else ""
                    print(f"  rep {rep + 1} {c:14} {r['wall_s']:7.2f} s {size / r['wall_s'] / 1e6:7.1f} MB/s{st}  CPU "
                          f"send {r['cpu_send_s']:5.2f} s recv {r['cpu_recv_s']:5.2f} s  (load {r['load1']:.2f})"
                          + (f"  streams {r['streams_used']} (lanes MiB {r['lane_mib']})" if "streams_used" in r else "")
                          + (f"  LANE FAILED: {r['lane_failures']}" if r.get("lane_failures") else ""), flush=True)
            link["delayline"] = teardown()
            link["runs"], link["errors"] = runs, errors
            link["rows"] = summarize(link, runs, tools)
            link["verdict"] = verdict(link)
            for r in link["rows"]:
                print(f"  {r['case']:14} median {r['median_s']:7.2f} s {r['mb_per_s']:7.1f} MB/s streams {streams_text(r):3}"
                      + (f" {r['share_of_link']:5.0%} of link" if "share_of_link" in r else "")
                      + (f", steady {r['steady_mb_per_s']:6.1f} MB/s" if "steady_mb_per_s" in r else "")
                      + f"  CPU/GiB send {r['cpu_send_s_per_gib']:.2f} s recv {r['cpu_recv_s_per_gib']:.2f} s")
            if link["verdict"]:
                print("  " + link["verdict"]["text"])
            if link["delayline"]:
                print(f"  delay line: {link['delayline']['cpu_s']:.1f} s CPU; " + "; ".join(link["delayline"]["counters"]))
            data["links"].append(link)
    finally:
        for pid in list(STATE["kids"]):
            kill_tree(pid)
        teardown()
        if ctx.get("made_run_sshd"):
            shutil.rmtree("/run/sshd", ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out) if args.out else (ROOT / "bench" / "results" /
                                           f"{date.strftime('%Y-%m-%dT%H%M%S')}-{platform.node()}-link.json")
    out.write_text(json.dumps(data, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown(data))
    try:
        png = draw_chart(data, out.with_suffix(".png"))
    except ImportError as e:  # matplotlib is optional: the JSON and the table are the results
        png = None
        print(f"no chart ({e}); `python3 bench/link.py --chart {out}` draws it later")
    print(f"\nresults: {out} and {out.with_suffix('.md').name}" + (f" and {png.name}" if png else ""))
    sys.exit(status)


if __name__ == "__main__":
    main()
