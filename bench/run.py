#!/usr/bin/env python3
"""Loopback benchmark: xfer vs. OpenBSD netcat (tar|nc for a tree) vs. an rsync daemon (see bench/README.md).

Stdlib only, Python 3.11+, meant to run as root on Debian from a fresh clone.
"""
import argparse, ctypes, datetime, hashlib, json, os, platform, random, re, shutil, signal
import socket, statistics, subprocess, sys, tempfile, threading, time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
LIVE = set()      # pids of our children not yet reaped; killed on timeout and on exit
TEMP_DIRS = []    # removed on exit, including Ctrl-C / SIGTERM
TREE_NAME = "tree"        # the tree workload's top folder; every receiver recreates it under DEST
TREE_SEED = 20261122      # file sizes and bytes of the tree: the same tree on every run and machine
TREE_MAX_FILE = 16 * 1024  # file sizes are uniform in 1 ..= this


class RunError(Exception):
    """One run of one case went wrong; the case is dropped, the others go on."""


def parse_size(text):
    """'1024', '256M', '1G', '64MiB' -> bytes (binary units)."""
    m = re.fullmatch(r"(\d+)([kmgt]?)(i?b)?", text.strip(), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size: {text!r}")
    return int(m[1]) << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m[2].lower()]


def machine_info():
    cpuinfo = Path("/proc/cpuinfo").read_text()
    field = lambda name: (re.search(rf"^{name}\s*:\s*(.*)$", cpuinfo, re.M) or [None, ""])[1]
    return {"host": socket.gethostname(), "nproc": len(os.sched_getaffinity(0)),
            "cpu": field("model name"), "kernel": platform.release(),
            "sha_ni": "sha_ni" in field("flags").split(), "python": platform.python_version(),
            "loadavg_at_start": os.getloadavg()}  # a busy machine makes every number suspect


def nc_binary():
    # Only OpenBSD netcat has -N (half-close after EOF); /bin/nc may be another variant.
    for name in ("nc.openbsd", "nc"):
        path = shutil.which(name)
        if path and "OpenBSD" in subprocess.run([path, "-h"], capture_output=True, text=True).stderr:
            return path
    return None


def ensure_peers(tools):
    need = [pkg for tool, pkg, ok in (("nc", "netcat-openbsd", nc_binary),
                                      ("rsync", "rsync", lambda: shutil.which("rsync")))
            if tool in tools and not ok()]
    if not need:
        return
    print(f"installing {' '.join(need)} ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", *need], check=True, env=env, stdout=subprocess.DEVNULL)


def version(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO).stdout.strip().splitlines()[0]
    except (OSError, IndexError):
        return None


# ---------------------------------------------------------------- processes
#
# Why not Popen + wait4 directly: exec keeps the pre-exec image's high-water RSS in the
# child's ru_maxrss, and a child forked (or vforked) from Python starts with Python's
# RSS, so every tool would "peak" at >= this script's size. Instead we are a child
# subreaper, and a throw-away sh starts the tool as a background job and exits: the tool
# is forked from a ~1 MiB dash, re-parented to us, and os.wait4() gives its true rusage.
# The job holds at `read` until we close its stdin pipe (the gate), which we do only
# after sh has exited, so even a tool that exits at once is our child, not sh's.
# Costs: ~1-2 ms of sh start-up inside each timed sender start, an RSS floor of ~1 MiB,
# and the tools ignore SIGINT (sh does that to background jobs): cleanup() SIGKILLs them.
PR_SET_CHILD_SUBREAPER = 36
LAUNCH = """exec 3<&0; i=$1 o=$2; shift 2
{ read -r x <&3; exec "$@" <"$i" >"$o" 3<&-; } &
echo $!"""


def spawn(ctx, cmd, stdin="/dev/null", stdout="/dev/null"):
    """Start cmd (stdin/stdout are paths) as our direct child; returns its pid.
    stderr goes to the run's log, so a failure can be explained."""
    sh = subprocess.Popen(["sh", "-c", LAUNCH, "sh", str(stdin), str(stdout), *map(str, cmd)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=ctx.log)
    with sh.stdin, sh.stdout:  # leaving this block closes the gate
        line = sh.stdout.readline()  # not read(): the job holds this pipe until its exec
        if sh.wait():
            raise RunError(f"could not start {cmd[0]}")
        pid = int(line)
        LIVE.add(pid)
    return pid


def reap(pid):
    """Wait for pid; returns (exit code, CPU s user+sys, peak RSS KiB). The rusage also covers
    descendants the process reaped itself (the rsync daemon's per-connection forks)."""
    _, status, ru = os.wait4(pid, 0)
    LIVE.discard(pid)
    return os.waitstatus_to_exitcode(status), ru.ru_utime + ru.ru_stime, ru.ru_maxrss


def exited(pid):
    if pid in LIVE and os.wait4(pid, os.WNOHANG)[0] == pid:
        LIVE.discard(pid)
    return pid not in LIVE


def kill_live():
    # A pid in LIVE is our unreaped child, so it cannot have been recycled. Its descendants
    # (tar and nc under an sh wrapper, an rsync daemon's fork) are listed before it is killed;
    # they are then re-parented to us (subreaper), so their pids stay ours until we reap them.
    for pid in list(LIVE):
        for p in [pid, *descendants(pid)]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:  # reaped by the main thread meanwhile (timer thread)
                pass


def kill_children():
    """SIGKILL and reap every child we have: the tools, and anything re-parented to us as
    subreaper (what a killed sh wrapper or rsync daemon leaves behind). After a failed run
    nothing of it may live on into the next one."""
    for _ in range(5):
        kids = [int(p) for t in Path("/proc/self/task").iterdir() for p in children_of(t)]
        if not kids:
            break
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            LIVE.discard(pid)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, pid, timeout=10.0):
    # Watch /proc/net/tcp for the LISTEN socket (state 0A): a probing connect would eat nc's one accept.
    want = f"0100007F:{port:04X}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(f[1] == want and f[3] == "0A" for f in
               (line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:])):
            return
        if exited(pid):
            raise RunError(f"receiver exited before listening on {port}")
        time.sleep(0.002)
    raise RunError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def children_of(task_dir):
    try:
        return Path(task_dir, "children").read_text().split()
    except FileNotFoundError:
        return []


def children(pid):
    return children_of(f"/proc/{pid}/task/{pid}")


def descendants(pid):
    """pid's children, grandchildren, ... parents before children (from /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except FileNotFoundError:
            continue
        for t in tasks:
            kids = [int(c) for c in children_of(f"/proc/{p}/task/{t}")]
            out += kids
            todo += kids
    return out


def result(wall, cpu_s, cpu_r, rss_s, rss_r):
    return {"wall": wall, "cpu": cpu_s + cpu_r, "cpu_send": cpu_s, "cpu_recv": cpu_r,
            "rss_send_kib": rss_s, "rss_recv_kib": rss_r}


def finish(t0, send, recv):
    """Wall time ends when both sides have exited; CPU is both sides added up."""
    rc_s, cpu_s, rss_s = reap(send)
    if rc_s:  # don't sit out the timeout waiting for a receiver that will never get data
        raise RunError(f"sender exit code {rc_s}")
    rc_r, cpu_r, rss_r = reap(recv)
    wall = time.perf_counter() - t0
    if rc_r:
        raise RunError(f"receiver exit code {rc_r}")
    return result(wall, cpu_s, cpu_r, rss_s, rss_r)


# ---------------------------------------------------------------- cases

def run_nc(ctx, w):
    port = free_port()
    # -d: never read stdin. With stdin at EOF, "-q 0" would quit after the first 16 KiB.
    recv = spawn(ctx, [ctx.nc, "-l", "-d", "127.0.0.1", port], stdout=ctx.dest / w.src.name)
    wait_listening(port, recv)
    t0 = time.perf_counter()
    # -N: shutdown(SHUT_WR) at EOF, so the receiver sees the end of the stream.
    send = spawn(ctx, [ctx.nc, "-N", "127.0.0.1", port], stdin=w.src)
    return finish(t0, send, recv)


def run_tar_nc(ctx, w):
    """The tree as one tar stream through nc. Each side is an sh running a pipeline: sh waits
    for both tools, so its rusage (from wait4) covers them (CPU added up, RSS the highest).
    dash has no pipefail: the exit code is nc's on the sending side and tar's on the receiving
    side, so a failing sender tar shows up as the receiver's tar error or in the tree check."""
    port = free_port()
    recv = spawn(ctx, ["sh", "-c", '"$1" -l -d 127.0.0.1 "$2" | tar -C "$3" -xf -',
                       "sh", ctx.nc, port, ctx.dest])
    wait_listening(port, recv)
    t0 = time.perf_counter()
    send = spawn(ctx, ["sh", "-c", 'tar -C "$2" -cf - "$3" | "$1" -N 127.0.0.1 "$4"',
                       "sh", ctx.nc, w.src.parent, w.src.name, port])
    return finish(t0, send, recv)


def run_rsync(ctx, w):
    # A daemon per run (started before the clock): when it is stopped, wait4 hands us the
    # rusage of the children it forked for the connection, i.e. the real receiver side.
    port = free_port()
    daemon = spawn(ctx, ["rsync", "--daemon", "--no-detach", f"--config={ctx.rsyncd_conf}",
                         "--address=127.0.0.1", f"--port={port}"])
    wait_listening(port, daemon)
    t0 = time.perf_counter()
    # For the tree, w.src is SRCPARENT/TREENAME (no trailing slash): rsync creates DEST/TREENAME.
    send = spawn(ctx, ["rsync", "-a", "--whole-file", w.src, f"rsync://127.0.0.1:{port}/bench/"])
    rc_s, cpu_s, rss_s = reap(send)
    while children(daemon) and time.perf_counter() - t0 < w.timeout:
        time.sleep(0.001)  # the daemon's per-connection child (the receiver) is still finishing
    wall = time.perf_counter() - t0
    os.kill(daemon, signal.SIGTERM)
    _, cpu_r, rss_r = reap(daemon)  # exit code of a SIGTERMed daemon means nothing
    if rc_s:
        raise RunError(f"rsync client exit code {rc_s}")
    return result(wall, cpu_s, cpu_r, rss_s, rss_r)


def read_port(pid, path, timeout=30.0):
    # Contract: the first stdout line is "listening on 127.0.0.1:PORT". stdout is a file
    # (see spawn), so poll it; a receiver that never says it is listening fails the run.
    deadline = time.monotonic() + timeout
    while b"\n" not in (text := path.read_bytes()):
        if exited(pid) or time.monotonic() > deadline:
            raise RunError(f"xfer recv printed no 'listening on' line: {text!r}")
        time.sleep(0.002)
    m = re.fullmatch(r"listening on 127\.0\.0\.1:(\d+)", text.split(b"\n")[0].decode().strip())
    if not m:
        raise RunError(f"unexpected first line from xfer recv: {text!r}")
    return int(m[1])


def run_xfer(ctx, w, chunk=None, cached=False):
    """A first send (--no-cache: the sender hashes the file) or, with cached, a repeat send whose
    digest comes from the sender's cache (warmed once before the timed runs). For the tree,
    w.src is SRCPARENT/TREENAME and the receiver recreates TREENAME/... under DEST."""
    out = ctx.work / "xfer-recv.out"
    out.write_bytes(b"")
    recv = spawn(ctx, [ctx.xfer, "recv", "--dir", ctx.dest, "--listen", "127.0.0.1:0",
                       "--once", "--quiet"], stdout=out)
    port = read_port(recv, out)
    t0 = time.perf_counter()
    extra = ["--chunk-size", chunk] if chunk else []
    if not cached:
        extra.append("--no-cache")
    send = spawn(ctx, [ctx.xfer, "send", w.src, f"127.0.0.1:{port}", "--quiet", *extra])
    return finish(t0, send, recv)


def run_sha256sum(ctx, w):
    out = ctx.work / "sha256sum.out"
    t0 = time.perf_counter()
    pid = spawn(ctx, ["sha256sum", w.src], stdout=out)
    rc, cpu, rss = reap(pid)
    wall = time.perf_counter() - t0
    if rc or out.read_text().split()[:1] != [w.sha]:
        raise RunError(f"sha256sum exit {rc}, output {out.read_text()!r}")
    return result(wall, cpu, 0.0, rss, 0)


def verify_file(ctx, w, full):
    """Size after every run, content once per case: a broken run must not count as a fast one."""
    dest_file = ctx.dest / w.src.name
    try:
        size = dest_file.stat().st_size
    except FileNotFoundError:
        raise RunError(f"no {dest_file.name} in destination; found {os.listdir(ctx.dest)}") from None
    if size != w.size:
        raise RunError(f"received {size} bytes, expected {w.size}")
    if full and sha256_file(dest_file) != w.sha:
        raise RunError("SHA-256 of the received file differs from the source")


def verify_tree(ctx, w, full):
    """Paths, kinds and sizes after every run (a walk: cheap), every file's SHA-256 once per case."""
    root = ctx.dest / w.src.name
    if not root.is_dir():
        raise RunError(f"no {w.src.name}/ in destination; found {sorted(os.listdir(ctx.dest))[:10]}")
    got = walk_tree(root)
    if got != w.manifest:
        missing = sorted(w.manifest.keys() - got.keys())
        extra = sorted(got.keys() - w.manifest.keys())
        wrong = sorted(k for k in w.manifest.keys() & got.keys() if got[k] != w.manifest[k])
        eg = lambda names: f" (e.g. {names[0]})" if names else ""
        raise RunError(f"received tree differs: {len(missing)} of {len(w.manifest)} entries missing{eg(missing)}, "
                       f"{len(extra)} extra{eg(extra)}, {len(wrong)} with another size or kind{eg(wrong)}")
    if full:
        bad = [rel for rel, digest in w.digests.items()
               if hashlib.sha256(Path(root, rel).read_bytes()).digest() != digest]
        if bad:
            raise RunError(f"SHA-256 differs for {len(bad)} of {len(w.digests)} received files (e.g. {bad[0]})")


def walk_tree(root):
    """{relative path: size} for regular files, "dir" for folders, "other" for anything else."""
    out, todo = {}, [""]
    while todo:
        rel = todo.pop()
        with os.scandir(os.path.join(root, rel)) as it:
            for e in it:
                r = f"{rel}/{e.name}" if rel else e.name
                if e.is_dir(follow_symlinks=False):
                    out[r] = "dir"
                    todo.append(r)
                elif e.is_file(follow_symlinks=False):
                    out[r] = e.stat(follow_symlinks=False).st_size
                else:
                    out[r] = "other"
    return out


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MIB):
            h.update(block)
    return h.hexdigest()


def clear_dir(path):
    for entry in os.scandir(path):
        shutil.rmtree(entry.path) if entry.is_dir(follow_symlinks=False) else os.unlink(entry.path)


# ---------------------------------------------------------------- workloads

def prepare(args, ctx, names, files):
    """Temp dirs, the rsync daemon's config, and one namespace per workload: what to send (src),
    how many bytes (size), how long a run may take (timeout), how to check a received copy."""
    ctx.src_dir = Path(tempfile.mkdtemp(prefix="xfer-bench-src-", dir="/dev/shm"))
    TEMP_DIRS.append(ctx.src_dir)
    ctx.dest = Path(tempfile.mkdtemp(prefix="xfer-bench-dst-", dir=args.dest_dir))  # never clear a user dir
    TEMP_DIRS.append(ctx.dest)
    ctx.work = Path(tempfile.mkdtemp(prefix="xfer-bench-work-"))
    TEMP_DIRS.append(ctx.work)
    # tmpfs takes a page per small file; rsync may keep a temp copy of a file next to the received one.
    src_need = (ctx.size if "file" in names else 0) + (files * (TREE_MAX_FILE // 2 + 4096) if "tree" in names else 0)
    dest_need = 2 * (ctx.size if "file" in names else 0) + (files * (TREE_MAX_FILE // 2 + 4096) if "tree" in names else 0)
    for d, need in ((ctx.src_dir, src_need), (ctx.dest, dest_need)):
        if shutil.disk_usage(d).free < need:
            sys.exit(f"not enough free space in {d} for {need / MIB:.0f} MiB")
    ctx.rsyncd_conf = ctx.work / "rsyncd.conf"
    ctx.rsyncd_conf.write_text(
        f"pid file = {ctx.work}/rsyncd.pid\nlog file = {ctx.work}/rsyncd.log\nuse chroot = no\n"
        f"[bench]\npath = {ctx.dest}\nread only = no\nuid = root\ngid = root\n")
    return [make_file(ctx) if n == "file" else make_tree(ctx, files) for n in names]


def make_file(ctx):
    w = argparse.Namespace(name="file", prefix="", src=ctx.src_dir / "bench.bin", size=ctx.size,
                           verify=verify_file, refs=("nc", "rsync"))
    w.timeout = 60 + w.size / (10 * MIB)  # generous: 10 MiB/s is far below any sane tool
    print(f"writing {w.size / MIB:.0f} MiB of random bytes to {w.src} ...", flush=True)
    h = hashlib.sha256()
    with open(w.src, "wb") as f:
        for left in range(w.size, 0, -16 * MIB):
            block = os.urandom(min(left, 16 * MIB))
            h.update(block)
            f.write(block)
    w.sha = h.hexdigest()
    return w


def make_tree(ctx, files):
    """FILES files of 1 ..= 16 KiB random bytes (seeded: the same tree every time) in 100 folders
    two levels deep (TREE/d00/d00 .. TREE/d09/d09, consecutive files per folder), plus two empty
    folders: TREE/empty and TREE/d05/e0/e1 (e0 holds only e1)."""
    w = argparse.Namespace(name="tree", prefix="tree/", src=ctx.src_dir / TREE_NAME, files=files,
                           verify=verify_tree, refs=("tree/tar|nc", "tree/rsync"))
    leaves = [f"d{a:02d}/d{b:02d}" for a in range(10) for b in range(10)]
    for d in leaves + ["empty", "d05/e0/e1"]:
        os.makedirs(w.src / d)
    rng = random.Random(TREE_SEED)
    width = max(4, len(str(files - 1)))
    w.digests, w.size = {}, 0
    for i in range(files):
        rel = f"{leaves[i * len(leaves) // files]}/f{i:0{width}d}"
        data = rng.randbytes(rng.randint(1, TREE_MAX_FILE))
        Path(w.src, rel).write_bytes(data)
        w.digests[rel] = hashlib.sha256(data).digest()
        w.size += len(data)
    w.manifest = walk_tree(w.src)  # what every receiver must recreate under DEST/TREE_NAME
    w.dirs = sum(v == "dir" for v in w.manifest.values())
    # One digest for the whole tree (paths and contents): equal across runs and machines.
    w.sha = hashlib.sha256(b"".join(f"{rel}\0".encode() + w.digests[rel] for rel in sorted(w.digests))).hexdigest()
    # 60 s + 1 s per 10 MiB like the file, plus 10 ms per file: generous for any per-file cost.
    w.timeout = 60 + w.size / (10 * MIB) + files / 100
    print(f"wrote tree {w.src}: {files} files ({w.size / 1e6:.1f} MB, {w.size / MIB:.1f} MiB) "
          f"in {w.dirs} folders, tree digest {w.sha[:16]}", flush=True)
    return w


# ---------------------------------------------------------------- main

def attempt(ctx, w, fn, log_name, check=None, full=False):
    """One run of fn with a deadline, checked with check(ctx, w, full). Raises RunError with the
    end of the run's stderr log; a failed run leaves none of its processes behind."""
    ctx.log = open(ctx.work / log_name.replace("/", "-"), "w+b")
    fired = threading.Event()
    timer = threading.Timer(w.timeout, lambda: (fired.set(), kill_live()))  # a hung run is killed, then reported
    timer.start()
    try:
        r = fn(ctx, w)
        if check:
            check(ctx, w, full)
        return r
    except (RunError, OSError) as e:
        timer.cancel()
        timer.join()  # no kill_live from the timer while we reap
        kill_children()
        why = f"timed out after {w.timeout:.0f} s; " if fired.is_set() else ""
        ctx.log.seek(0)
        raise RunError(f"{why}{e} {ctx.log.read()[-500:].decode(errors='replace').strip()}") from None
    finally:
        timer.cancel()
        ctx.log.close()


def summarize(runs, w):
    walls = [r["wall"] for r in runs]
    med = statistics.median(walls)
    s = {"n": len(runs), "median_s": med, "min_s": min(walls), "max_s": max(walls),
         "mb_per_s": w.size / med / 1e6, "median_cpu_s": statistics.median(r["cpu"] for r in runs),
         "max_rss_send_mib": max(r["rss_send_kib"] for r in runs) / 1024,
         "max_rss_recv_mib": max(r["rss_recv_kib"] for r in runs) / 1024}
    if w.name == "tree":
        s["files_per_s"] = w.files / med
    return s


def print_table(cases, summaries, errors):
    def ratio(s, ref):
        return f"{s['median_s'] / summaries[ref]['median_s']:.2f}" if ref in summaries else "-"
    head = f"{'case':<22}{'median s':>9}{'min':>8}{'max':>8}{'MB/s':>8}{'CPU s':>7}{'RSS snd':>9}{'RSS rcv':>9}{'x nc':>7}{'x rsync':>8}"
    print("\n" + head + "\n" + "-" * len(head))
    for name, _, w, _ in cases:
        if s := summaries.get(name):
            print(f"{name:<22}{s['median_s']:>9.3f}{s['min_s']:>8.3f}{s['max_s']:>8.3f}{s['mb_per_s']:>8.0f}"
                  f"{s['median_cpu_s']:>7.2f}{s['max_rss_send_mib']:>9.1f}{s['max_rss_recv_mib']:>9.1f}"
                  f"{ratio(s, w.refs[0]):>7}{ratio(s, w.refs[1]):>8}")
    for name, err in errors.items():
        print(f"{name:<22}FAILED: {err}")
    print("MB = 10^6 bytes; RSS in MiB (peak over runs); CPU = user+sys of sender+receiver, median.\n"
          "rsync receiver = the daemon incl. its per-connection forks (a fresh daemon per run).")
    if any(w.name == "file" for _, _, w, _ in cases):
        print("sha256sum = one local read+hash of the source, for hashing-speed reference.")
    if any(w.name == "tree" for _, _, w, _ in cases):
        print("tree/*: MB/s counts file bytes; 'x nc' is relative to tree/tar|nc; tar|nc sides are sh "
              "pipelines (CPU of both tools, RSS of the larger).")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workload", choices=("file", "tree", "both"), default="file",
                    help="one big file (default), a tree of small files, or both")
    ap.add_argument("--size", type=parse_size, help="test file size, e.g. 256M, 1G (default 1G)")
    ap.add_argument("--files", type=int, help="files in the tree workload (default 10000)")
    ap.add_argument("--reps", type=int, help="repetitions per case (default 5)")
    ap.add_argument("--quick", action="store_true", help="256 MiB, 2000 files and 3 reps unless given")
    ap.add_argument("--tools", default="xfer,nc,rsync", help="subset of xfer,nc,rsync (nc: tar|nc for the tree)")
    ap.add_argument("--chunk-sizes", default="", help="extra xfer cases (file workload), e.g. 1024,65536,1M")
    ap.add_argument("--dest-dir", default="/dev/shm", help="where received files land (a temp dir inside)")
    ap.add_argument("--out", help="JSON output (default bench/results/<date>-<host>.json)")
    ap.add_argument("--no-build", action="store_true", help="skip cargo build --release")
    args = ap.parse_args()
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if bad := set(tools) - {"xfer", "nc", "rsync"}:
        ap.error(f"unknown tools: {bad}")
    chunks = [parse_size(c) for c in args.chunk_sizes.split(",") if c.strip()]
    names = ["file", "tree"] if args.workload == "both" else [args.workload]
    files = args.files or (2000 if args.quick else 10_000)
    if files < 1:
        ap.error("--files must be at least 1")
    ctx = argparse.Namespace(size=args.size or (256 * MIB if args.quick else 1 << 30))
    reps = args.reps or (3 if args.quick else 5)

    info = machine_info()
    print(f"host {info['host']}: {info['nproc']} CPUs, {info['cpu']}, kernel {info['kernel']}, "
          f"sha_ni {'yes' if info['sha_ni'] else 'no'}, load {info['loadavg_at_start'][0]:.2f}", flush=True)
    ensure_peers(tools)
    ctx.nc = nc_binary()
    if "xfer" in tools:
        if not args.no_build and subprocess.run(["cargo", "build", "--release"], cwd=REPO).returncode:
            sys.exit("cargo build --release failed")
        ctx.xfer = str(Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"), "release", "xfer"))
        if not os.access(ctx.xfer, os.X_OK):
            sys.exit(f"{ctx.xfer} not found; build it or drop xfer from --tools")
    workloads = prepare(args, ctx, names, files)

    cases = []  # (name, run function, workload, check): run round-robin below
    for w in workloads:
        for t in tools:
            if t == "nc":
                cases.append((w.prefix + ("nc" if w.name == "file" else "tar|nc"),
                              run_nc if w.name == "file" else run_tar_nc, w, w.verify))
            elif t == "rsync":
                cases.append((w.prefix + "rsync", run_rsync, w, w.verify))
            else:
                cases.append((w.prefix + "xfer", run_xfer, w, w.verify))
                cases.append((w.prefix + "xfer-cached", lambda c, w: run_xfer(c, w, cached=True), w, w.verify))
                if w.name == "file":
                    cases += [(f"xfer-chunk-{n}", lambda c, w, n=n: run_xfer(c, w, n), w, w.verify) for n in chunks]
        if w.name == "file":
            cases.append(("sha256sum", run_sha256sum, w, None))
    runs = {name: [] for name, *_ in cases}
    errors = {}

    # xfer's digest cache lives in the bench's work dir: never the user's, gone afterwards.
    os.environ["XDG_CACHE_HOME"] = str(ctx.work / "cache")
    if "xfer" in tools:  # warm it: every timed xfer-cached run is a repeat send
        for w in workloads:
            try:
                attempt(ctx, w, lambda c, w: run_xfer(c, w, cached=True), f"{w.prefix}warm-up.log")
            except RunError as e:
                errors[w.prefix + "xfer-cached"] = f"warm-up: {e}"
                print(f"  warm-up {w.prefix}xfer-cached FAILED: {e}", flush=True)
            clear_dir(ctx.dest)
    what = ", ".join(f"file {w.size / MIB:.0f} MiB" if w.name == "file" else
                     f"tree of {w.files} files ({w.size / 1e6:.1f} MB)" for w in workloads)
    print(f"{len(cases)} cases x {reps} reps, {what}, received into {ctx.dest}", flush=True)

    for rep in range(1, reps + 1):  # round-robin, so drift (thermal, noisy neighbours) hits all cases alike
        for name, fn, w, check in cases:
            if name in errors:
                continue
            clear_dir(ctx.dest)
            try:
                r = attempt(ctx, w, fn, f"{name}-{rep}.log", check, full=not runs[name])
            except RunError as e:
                errors[name] = f"rep {rep}: {e}"
                print(f"  rep {rep} {name:<22} FAILED: {errors[name]}", flush=True)
                continue
            runs[name].append({"rep": rep, **r})
            print(f"  rep {rep} {name:<22} {r['wall']:7.3f} s  cpu {r['cpu']:6.2f} s  "
                  f"rss {r['rss_send_kib'] / 1024:6.1f}/{r['rss_recv_kib'] / 1024:6.1f} MiB", flush=True)
    clear_dir(ctx.dest)

    summaries = {name: summarize(runs[name], w) for name, _, w, _ in cases if runs[name] and name not in errors}
    print_table(cases, summaries, errors)
    now = datetime.datetime.now()
    out = Path(args.out or REPO / "bench" / "results" / f"{now:%Y-%m-%dT%H%M%S}-{info['host']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    wl = {w.name: w for w in workloads}
    config = {"workload": names, "size": ctx.size if "file" in wl else None, "reps": reps, "tools": tools,
              "chunk_sizes": chunks, "dest_dir": args.dest_dir,
              "source_sha256": wl["file"].sha if "file" in wl else None}
    if "tree" in wl:
        t = wl["tree"]
        config["tree"] = {"files": t.files, "dirs": t.dirs, "bytes": t.size, "seed": TREE_SEED,
                          "max_file": TREE_MAX_FILE, "tree_sha256": t.sha,
                          "layout": f"{TREE_NAME}/dNN/dNN/fNNNN (100 folders) + {TREE_NAME}/empty, {TREE_NAME}/d05/e0/e1"}
    out.write_text(json.dumps({
        "date": now.isoformat(timespec="seconds"), "machine": info, "config": config,
        "versions": {"xfer_git": version(["git", "describe", "--always", "--dirty"]),
                     "netcat": version(["dpkg-query", "-W", "-f=${Version}\n", "netcat-openbsd"]),
                     "rsync": version(["rsync", "--version"]),
                     "tar": version(["tar", "--version"]) if "tree" in wl else None},
        "cases": {name: {"workload": w.name, "runs": runs[name], "summary": summaries.get(name),
                         "error": errors.get(name)} for name, _, w, _ in cases},
    }, indent=2) + "\n")
    print(f"raw results: {out}")
    return 1 if errors else 0


def cleanup():
    # Kill every child we have: the tools, and anything re-parented to us as subreaper
    # (e.g. an rsync daemon's fork if the daemon was killed first). Then remove temp dirs.
    kill_children()
    for d in TEMP_DIRS:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    # SIGTERM/SIGHUP become SystemExit so the finally below still removes daemons and temp files.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _: sys.exit(128 + signum))
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.exit("prctl(PR_SET_CHILD_SUBREAPER) failed; Linux is required")
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        cleanup()
