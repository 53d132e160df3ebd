#!/usr/bin/env python3
"""Loopback benchmark: xfer vs. OpenBSD netcat (tar|nc for folders), netcat with sha256sum on both
sides, an rsync daemon and scp to a private sshd; one big file, a tree of small files and a folder
of 10 MiB files; received into RAM (tmpfs) and onto disk (made durable). xfer runs encrypted (its
default since protocol v5), each case with an insecure: twin (--insecure on both sides) beside it
in the same run. See bench/README.md.

Python 3.11+, meant to run as root on Debian from a fresh clone. Installs the peers with apt-get
and matplotlib (for the chart) with pip or apt-get if they are missing.
"""
import argparse, csv, ctypes, datetime, hashlib, importlib, json, os, platform, random, re, shlex
import shutil, signal, socket, statistics, subprocess, sys, tempfile, threading, time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
LIVE = set()      # pids of our children not yet reaped; killed on timeout and on exit
TEMP_DIRS = []    # removed on exit, including Ctrl-C / SIGTERM
MADE_DIRS = []    # folders outside the temp dirs that we had to create (/run/sshd, ~/.ssh): removed if empty
TREE_NAME = "tree"        # the tree workload's top folder; every receiver recreates it under DEST
TREE_SEED = 20261122      # file sizes and bytes of the tree: the same tree on every run and machine
TREE_MAX_FILE = 16 * 1024  # file sizes are uniform in 1 ..= this
MANY_NAME = "many"        # the many workload's folder: MANY_NAME/f000 .. f099
GROUPS = ("xfer", "nc", "rsync", "scp", "ref")
# Every case name --tools accepts (besides the groups and xfer-chunk-N), with its group.
# For folders nc is tar|nc (and nc+sha256sum is tar|nc+sha256sum).
CASE_GROUP = {"xfer": "xfer", "xfer-cached": "xfer", "xfer-blake3": "xfer", "xfer-blake3-cached": "xfer",
              "nc": "nc", "nc+sha256sum": "nc", "rsync": "rsync", "scp": "scp", "dd": "ref", "sha256sum": "ref",
              "floor-sha256": "ref", "floor-blake3": "ref"}
CASE_NAMES = tuple(CASE_GROUP)
BASE = "base:"            # --baseline: the twin of xfer case NAME, run with the baseline binary, is BASE + NAME
INSECURE = "insecure:"    # the twin of xfer case NAME with --insecure on both sides (plaintext) is INSECURE + NAME
# The issue's speed targets (issue 12): encrypted median / its insecure: twin's median in the same
# run, per destination. (workload, case, limit, what)
TARGETS = (("file", "xfer-blake3", 1.25, "encrypted BLAKE3 1 GiB <= 1.25 x insecure BLAKE3"),
           ("file", "xfer", 1.05, "encrypted SHA-256 1 GiB <= 1.05 x insecure SHA-256"),
           ("tree", "xfer", 1.15, "10,000 files <= 1.15 x insecure"))
# Issue 14's targets: a case's median over a reference's median in the same run and section (the
# hash floor: one pass of xfer's own hash over the same file, `hash-speed --file`), for the default
# (encrypted) case. (workload, case, reference case, limit, what)
TARGETS14 = (("file", "xfer", "floor-sha256", 1.4, "SHA-256 1 GiB first send <= 1.4 x one SHA-256 pass (2-core loopback)"),
             ("file", "xfer-blake3", "rsync", 0.75, "BLAKE3 1 GiB <= 0.75 x rsync daemon"),
             ("file", "xfer-blake3", "nc", 1.2, "BLAKE3 1 GiB <= 1.2 x nc"),
             ("tree", "xfer", "rsync", 1.0, "10,000 files, SHA-256 <= 1.0 x rsync daemon"),
             ("tree", "xfer-blake3", "tar|nc", 1.5, "10,000 files, BLAKE3 <= 1.5 x tar|nc"))
DEFAULT_BUDGET = 540      # s: the default run stops adding repetitions when the next would pass this
RESERVE = 20              # s kept for the table, chart and cleanup when the budget is checked


def plain(name):
    """The case a twin belongs to: 'base:insecure:xfer-cached' -> 'xfer-cached'."""
    return name.removeprefix(BASE).removeprefix(INSECURE)


class RunError(Exception):
    """One run of one case went wrong; the case is dropped, the others go on."""


def parse_size(text):
    """'1024', '256M', '1G', '64MiB' -> bytes (binary units)."""
    m = re.fullmatch(r"(\d+)([kmgt]?)(i?b)?", text.strip(), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size: {text!r}")
    return int(m[1]) << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m[2].lower()]


def human(n):
    if n >= 1 << 30 and n % (1 << 28) == 0:
        return f"{n / (1 << 30):g} GiB"
    return f"{n / MIB:g} MiB" if n >= MIB else f"{n / 1024:g} KiB"


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MIB):
            h.update(block)
    return h.hexdigest()


def machine_info():
    cpuinfo = Path("/proc/cpuinfo").read_text()
    field = lambda name: (re.search(rf"^{name}\s*:\s*(.*)$", cpuinfo, re.M) or [None, ""])[1]
    return {"host": socket.gethostname(), "nproc": len(os.sched_getaffinity(0)),
            "cpu": field("model name"), "kernel": platform.release(),
            "sha_ni": "sha_ni" in field("flags").split(), "python": platform.python_version(),
            "loadavg_at_start": os.getloadavg()}  # a busy machine makes every number suspect


def fs_type(path):
    """File system type of the mount holding path (from /proc/mounts)."""
    path, best = os.path.realpath(path), ("", "?")
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mnt, typ = line.split()[:3]
        mnt = mnt.replace("\\040", " ")
        if (path + "/").startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(best[0]):
            best = (mnt, typ)
    return best[1]


# ---------------------------------------------------------------- installing what is missing

APT = {"updated": False}


def apt_install(pkgs):
    """apt-get install; returns True on success (a failure drops the cases that need it)."""
    print(f"installing {' '.join(pkgs)} with apt-get ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    quiet = dict(env=env, stdout=subprocess.DEVNULL)
    if not APT["updated"]:
        APT["updated"] = subprocess.run(["apt-get", "update", "-qq"], **quiet).returncode == 0
    return subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *pkgs],
                          **quiet).returncode == 0


def nc_binary():
    # Only OpenBSD netcat has -N (half-close after EOF); /bin/nc may be another variant.
    for name in ("nc.openbsd", "nc"):
        path = shutil.which(name)
        if path and "OpenBSD" in subprocess.run([path, "-h"], capture_output=True, text=True).stderr:
            return path
    return None


def sshd_binary():
    # sshd must be started by its absolute path (it re-executes itself per connection).
    path = shutil.which("sshd") or "/usr/sbin/sshd"
    return path if os.access(path, os.X_OK) and shutil.which("scp") and shutil.which("ssh-keygen") else None


def ensure_peers(groups):
    """Installs the Debian packages of the selected peers; returns {group: why it is missing}."""
    want = {"nc": ("netcat-openbsd", nc_binary), "rsync": ("rsync", lambda: shutil.which("rsync")),
            "scp": ("openssh-server openssh-client", sshd_binary)}
    need = {g: pkg for g, (pkg, ok) in want.items() if g in groups and not ok()}
    if need and not apt_install(" ".join(need.values()).split()):
        print("  apt-get install failed; trying one package at a time", flush=True)
        for pkg in need.values():
            apt_install(pkg.split())
    return {g: f"{want[g][0]} could not be installed" for g in need if not want[g][1]()}


def importable(python, module):
    if python is None:
        importlib.invalidate_caches()
        try:
            importlib.import_module(module)
            return True
        except ImportError:
            return False
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0


def chart_python():
    """Where to draw the chart: None = in this process, a path = that Python (it has matplotlib),
    False = nowhere (the run goes on without a chart). Installs matplotlib if missing: with pip for
    this Python, or Debian's python3-matplotlib (for /usr/bin/python3) if pip cannot."""
    if importable(None, "matplotlib"):
        return None
    system = "/usr/bin/python3"
    is_system = os.path.exists(system) and os.path.realpath(sys.executable) == os.path.realpath(system)
    if not is_system:
        print("installing matplotlib with pip (for the chart) ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        "--root-user-action=ignore", "matplotlib"], stdout=subprocess.DEVNULL)
        if importable(None, "matplotlib"):
            return None
    if os.path.exists(system) and (importable(system, "matplotlib") or apt_install(["python3-matplotlib"])):
        if importable(None if is_system else system, "matplotlib"):
            return None if is_system else system
    print("  no matplotlib: no chart this time", flush=True)
    return False


def version(cmd, stderr=False):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        return (p.stderr if stderr else p.stdout).strip().splitlines()[0]
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


def spawn(ctx, cmd, stdin="/dev/null", stdout="/dev/null", env=None):
    """Start cmd (stdin/stdout are paths) as our direct child; returns its pid.
    stderr goes to the run's log, so a failure can be explained. env: None = ours."""
    sh = subprocess.Popen(["sh", "-c", LAUNCH, "sh", str(stdin), str(stdout), *map(str, cmd)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=ctx.log, env=env)
    with sh.stdin, sh.stdout:  # leaving this block closes the gate
        line = sh.stdout.readline()  # not read(): the job holds this pipe until its exec
        if sh.wait():
            raise RunError(f"could not start {cmd[0]}")
        pid = int(line)
        LIVE.add(pid)
    return pid


def shell(script, **args):
    """An `sh -c` command line; script refers to args as $name (each one shell-quoted)."""
    return ["sh", "-c", re.sub(r"\$(\w+)", lambda m: shlex.quote(str(args[m[1]])), script)]


def reap(pid):
    """Wait for pid; returns (exit code, CPU s user+sys, peak RSS KiB). The rusage also covers
    descendants the process reaped itself (the rsync daemon's and sshd's per-connection forks,
    the tools under an sh wrapper)."""
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
    subreaper (what a killed sh wrapper, rsync daemon or sshd leaves behind). After a failed run
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


def finish_daemon(ctx, w, t0, send, daemon):
    """For a per-run daemon (rsync, sshd): the run ends when the client and the daemon's child for
    the connection have both exited. Stopping the daemon then hands us the rusage of the children
    it reaped, i.e. the real receiver side."""
    rc_s, cpu_s, rss_s = reap(send)
    while children(daemon) and time.perf_counter() - t0 < ctx.timeout:
        time.sleep(0.001)  # the daemon's per-connection child (the receiver) is still finishing
    wall = time.perf_counter() - t0
    os.kill(daemon, signal.SIGTERM)
    _, cpu_r, rss_r = reap(daemon)  # exit code of a SIGTERMed daemon means nothing
    if rc_s:
        raise RunError(f"client exit code {rc_s}")
    return result(wall, cpu_s, cpu_r, rss_s, rss_r)


# ---------------------------------------------------------------- cases
#
# Each run function sends w.src into ctx.dest (a fresh empty folder). On a disk destination
# (ctx.disk) every tool must leave the data durable before the clock stops: xfer does that by
# itself (fsync of a single file, one syncfs for a folder), rsync gets --fsync, and the others
# are followed by coreutils sync: `sync FILE` (fsync of that file, what dd conv=fsync does) for
# the single file, `sync -f DIR` (one syncfs, as xfer does for a batch) for a folder.

def sync_step(ctx, w):
    """The shell step that makes a received copy durable ('' in RAM)."""
    if not ctx.disk:
        return ""
    if w.name == "file":
        return f" && sync {shlex.quote(str(ctx.dest / w.src.name))}"
    return f" && sync -f {shlex.quote(str(ctx.dest))}"


def run_nc(ctx, w):
    port = free_port()
    # -d: never read stdin. With stdin at EOF, "-q 0" would quit after the first 16 KiB.
    if ctx.disk:
        recv = spawn(ctx, shell("$nc -l -d 127.0.0.1 $port > $out" + sync_step(ctx, w),
                                nc=ctx.nc, port=port, out=ctx.dest / w.src.name))
    else:
        recv = spawn(ctx, [ctx.nc, "-l", "-d", "127.0.0.1", port], stdout=ctx.dest / w.src.name)
    wait_listening(port, recv)
    t0 = time.perf_counter()
    # -N: shutdown(SHUT_WR) at EOF, so the receiver sees the end of the stream.
    send = spawn(ctx, [ctx.nc, "-N", "127.0.0.1", port], stdin=w.src)
    return finish(t0, send, recv)


def run_tar_nc(ctx, w):
    """A folder as one tar stream through nc. Each side is an sh running a pipeline: sh waits
    for both tools, so its rusage (from wait4) covers them (CPU added up, RSS the highest).
    dash has no pipefail: the exit code is nc's on the sending side and tar's on the receiving
    side, so a failing sender tar shows up as the receiver's tar error or in the tree check."""
    port = free_port()
    recv = spawn(ctx, shell("$nc -l -d 127.0.0.1 $port | tar -C $dest -xf -" + sync_step(ctx, w),
                            nc=ctx.nc, port=port, dest=ctx.dest))
    wait_listening(port, recv)
    t0 = time.perf_counter()
    send = spawn(ctx, shell("tar -C $parent -cf - $name | $nc -N 127.0.0.1 $port",
                            parent=w.src.parent, name=w.src.name, nc=ctx.nc, port=port))
    return finish(t0, send, recv)


def run_nc_sha(ctx, w):
    """Verification by hand: the sender runs sha256sum, then nc (tar|nc for a folder); the
    receiver runs nc (tar), then sha256sum on what it received. Timed as a whole; both lists
    must then agree (checked after the clock stops)."""
    sums_s, sums_r = ctx.work / "sums-send.txt", ctx.work / "sums-recv.txt"
    port = free_port()
    if w.name == "file":
        out = ctx.dest / w.src.name
        recv = spawn(ctx, shell("$nc -l -d 127.0.0.1 $port > $out" + sync_step(ctx, w) + " && sha256sum $out > $sums",
                                nc=ctx.nc, port=port, out=out, sums=sums_r))
        send_cmd = shell("sha256sum $src > $sums && $nc -N 127.0.0.1 $port < $src",
                         src=w.src, sums=sums_s, nc=ctx.nc, port=port)
    else:
        hash_all = "find $name -type f -print0 | xargs -0 -r sha256sum > $sums"
        recv = spawn(ctx, shell("$nc -l -d 127.0.0.1 $port | tar -C $dest -xf -" + sync_step(ctx, w)
                                + " && cd $dest && " + hash_all,
                                nc=ctx.nc, port=port, dest=ctx.dest, name=w.src.name, sums=sums_r))
        send_cmd = shell("cd $parent && " + hash_all + " && tar -cf - $name | $nc -N 127.0.0.1 $port",
                         parent=w.src.parent, name=w.src.name, sums=sums_s, nc=ctx.nc, port=port)
    wait_listening(port, recv)
    t0 = time.perf_counter()
    send = spawn(ctx, send_cmd)
    r = finish(t0, send, recv)
    if w.name == "file":
        got = [sums.read_text().split()[:1] for sums in (sums_s, sums_r)]
        if got != [[w.sha], [w.sha]]:
            raise RunError(f"sha256sum lists disagree with the source: {got}")
    else:
        got = [sorted(sums.read_text().splitlines()) for sums in (sums_s, sums_r)]
        if got[0] != got[1] or len(got[0]) != w.files:
            raise RunError(f"sha256sum lists differ: {len(got[0])} lines sent, {len(got[1])} received, "
                           f"{len(set(got[0]) ^ set(got[1]))} lines not in both")
    return r


def run_rsync(ctx, w):
    # A daemon per run (started before the clock): when it is stopped, wait4 hands us the
    # rusage of the children it forked for the connection, i.e. the real receiver side.
    port = free_port()
    daemon = spawn(ctx, ["rsync", "--daemon", "--no-detach", f"--config={ctx.rsyncd_conf}",
                         "--address=127.0.0.1", f"--port={port}"])
    wait_listening(port, daemon)
    t0 = time.perf_counter()
    # For a folder, w.src is SRCPARENT/NAME (no trailing slash): rsync creates DEST/NAME.
    # --fsync (disk only) is passed on to the daemon's receiver: it fsyncs every file it writes.
    send = spawn(ctx, ["rsync", "-a", "--whole-file", *(["--fsync"] if ctx.disk else []), w.src,
                       f"rsync://127.0.0.1:{port}/{ctx.dname}/"])
    return finish_daemon(ctx, w, t0, send, daemon)


def run_scp(ctx, w):
    """scp (OpenSSH's default: the SFTP protocol) to a private sshd started for this run on a free
    loopback port, with the bench's own config, host key and authorized key. On disk the sender's
    sh runs `sync` after scp (scp has no fsync option): it counts as sender CPU."""
    port = free_port()
    daemon = spawn(ctx, [ctx.sshd, "-D", "-e", "-f", ctx.sshd_conf, "-o", f"ListenAddress=127.0.0.1:{port}"])
    wait_listening(port, daemon)
    t0 = time.perf_counter()
    scp = ["scp", "-q", *(["-r"] if w.name != "file" else []), "-P", port, *ctx.ssh_opts,
           w.src, f"root@127.0.0.1:{ctx.dest}/"]
    send = spawn(ctx, shell(shlex.join(map(str, scp)) + sync_step(ctx, w)) if ctx.disk else scp)
    return finish_daemon(ctx, w, t0, send, daemon)


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


def mode_args(ctx, mode):
    """xfer's options for a mode, the same on both sides: "secure" = encrypted and authenticated
    (the default since protocol v5) by the code in ctx.code_file, "insecure" = --insecure
    (plaintext, sendfile), None = no option (an xfer from before v5: plaintext is all it has)."""
    return {"secure": ["--code-file", ctx.code_file], "insecure": ["--insecure"], None: []}[mode]


def run_xfer(ctx, w, chunk=None, cached=False, hash=None, base=False, mode=None, streams=None):
    """A first send (--no-cache: the sender hashes the file) or, with cached, a repeat send whose
    digest comes from the sender's cache (warmed once before the timed runs). For a folder,
    w.src is SRCPARENT/NAME and the receiver recreates NAME/... under DEST. xfer makes what it
    received durable before it acknowledges it, so the disk destination needs nothing extra.
    base: the --baseline binary on both sides (its wire protocol may differ), with its own
    digest cache and keys (their formats may differ too). mode: see mode_args. Each side has its
    own XDG_CONFIG_HOME (identity key, pinned and trusted peers) in the work dir: the receiver is
    not run with --remember, so every encrypted send proves the code (a code handshake)."""
    xfer, env = (ctx.base_xfer, ctx.base_env) if base else (ctx.xfer, ctx.env)
    out = ctx.work / "xfer-recv.out"
    out.write_bytes(b"")
    recv = spawn(ctx, [xfer, "recv", "--dir", ctx.dest, "--listen", "127.0.0.1:0",
                       "--once", "--quiet", *mode_args(ctx, mode)], stdout=out, env=env["recv"])
    port = read_port(recv, out)
    t0 = time.perf_counter()
    extra = ["--chunk-size", chunk] if chunk else []
    if streams:
        extra += ["--streams", str(streams)]
    if hash:
        extra += ["--hash", hash]
    if not cached:
        extra.append("--no-cache")
    send = spawn(ctx, [xfer, "send", w.src, f"127.0.0.1:{port}", "--quiet", *extra, *mode_args(ctx, mode)],
                 env=env["send"])
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


def run_floor(ctx, w, alg):
    """The hash floor: one pass of xfer's own hash (the sender's `hash_reader`) over the source
    file, as `hash-speed --file` (a first send cannot take less than this on one core)."""
    out = ctx.work / "floor.out"
    t0 = time.perf_counter()
    pid = spawn(ctx, [ctx.hash_speed, "--file", w.src, "--hash", alg], stdout=out)
    rc, cpu, rss = reap(pid)
    wall = time.perf_counter() - t0
    if rc or (alg == "sha256" and out.read_text().split()[:1] != [w.sha]):
        raise RunError(f"hash-speed exit {rc}, output {out.read_text()!r}")
    return result(wall, cpu, 0.0, rss, 0)


def run_dd(ctx, w):
    """A local copy onto the disk destination, durable (conv=fsync): what the disk can do."""
    t0 = time.perf_counter()
    pid = spawn(ctx, ["dd", f"if={w.src}", f"of={ctx.dest / w.src.name}", "bs=1M", "conv=fsync", "status=none"])
    rc, cpu, rss = reap(pid)
    wall = time.perf_counter() - t0
    if rc:
        raise RunError(f"dd exit code {rc}")
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
    if full and not same_bytes(dest_file, w.src):
        raise RunError("the received file differs from the source")


def verify_tree(ctx, w, full):
    """Paths, kinds and sizes after every run (a walk: cheap), every file's bytes once per case."""
    root = ctx.dest / w.src.name
    if not root.is_dir():
        raise RunError(f"no {w.src.name}/ in destination; found {sorted(os.listdir(ctx.dest))[:10]}")
    got = walk_tree(root)
    if got != w.manifest:
        missing = sorted(w.manifest.keys() - got.keys())
        extra = sorted(got.keys() - w.manifest.keys())
        wrong = sorted(k for k in w.manifest.keys() & got.keys() if got[k] != w.manifest[k])
        eg = lambda names: f" (e.g. {names[0]})" if names else ""
        raise RunError(f"received folder differs: {len(missing)} of {len(w.manifest)} entries missing{eg(missing)}, "
                       f"{len(extra)} extra{eg(extra)}, {len(wrong)} with another size or kind{eg(wrong)}")
    if full:
        bad = [rel for rel, kind in w.manifest.items() if kind != "dir" and not same_bytes(root / rel, w.src / rel)]
        if bad:
            raise RunError(f"{len(bad)} of {w.files} received files differ from the source (e.g. {bad[0]})")


def same_bytes(a, b):
    """Byte-for-byte comparison with the source (stronger than a digest, and much faster than
    SHA-256 without sha_ni: both copies are in the page cache)."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(4 * MIB), fb.read(4 * MIB)
            if x != y:
                return False
            if not x:
                return True


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


def clear_dir(path):
    for entry in os.scandir(path):
        shutil.rmtree(entry.path) if entry.is_dir(follow_symlinks=False) else os.unlink(entry.path)


# ---------------------------------------------------------------- workloads and destinations

def prepare(args, ctx, names, dest_names, groups):
    """Temp dirs (source in RAM; one destination per --dest), the rsync daemon's config, the
    private sshd's keys and config, and one namespace per workload: what to send (src), how many
    bytes (size), how long a run may take (timeout), how to check a received copy."""
    ctx.src_dir = Path(tempfile.mkdtemp(prefix="xfer-bench-src-", dir="/dev/shm"))
    TEMP_DIRS.append(ctx.src_dir)
    ctx.work = Path(tempfile.mkdtemp(prefix="xfer-bench-work-"))
    TEMP_DIRS.append(ctx.work)
    # tmpfs takes a page per small file; rsync may keep a temp copy of a file next to the received one.
    need = {"file": ctx.size, "many": args.many_files * ctx.many_size,
            "tree": ctx.files * (TREE_MAX_FILE // 2 + 4096)}
    src_need = sum(need[n] for n in names)
    # One workload at a time in a destination, plus a temp copy of its largest file (rsync).
    dest_need = max(need[n] for n in names) + (ctx.size if "file" in names else ctx.many_size)
    dests = []
    for dn in dest_names:
        parent = args.ram_dir if dn == "ram" else args.disk_dir
        d = argparse.Namespace(name=dn, disk=dn == "disk", parent=parent, fstype=fs_type(parent))
        d.path = Path(tempfile.mkdtemp(prefix="xfer-bench-dst-", dir=parent))  # never clear a user dir
        TEMP_DIRS.append(d.path)
        dests.append(d)
        if d.disk and d.fstype in ("tmpfs", "ramfs"):
            print(f"note: the disk destination {parent} is on {d.fstype}, not a disk", flush=True)
    by_fs = {}  # the source and the RAM destination share /dev/shm
    for path, n in [(ctx.src_dir, src_need)] + [(d.path, dest_need) for d in dests]:
        dev = os.stat(path).st_dev
        by_fs[dev] = (by_fs.get(dev, (path, 0))[0], by_fs.get(dev, (path, 0))[1] + n)
    for path, n in by_fs.values():
        if shutil.disk_usage(path).free < n:
            sys.exit(f"not enough free space in {path.parent} for {n / MIB:.0f} MiB")
    ctx.rsyncd_conf = ctx.work / "rsyncd.conf"
    ctx.rsyncd_conf.write_text(
        f"pid file = {ctx.work}/rsyncd.pid\nlog file = {ctx.work}/rsyncd.log\nuse chroot = no\n"
        + "".join(f"[{d.name}]\npath = {d.path}\nread only = no\nuid = root\ngid = root\n" for d in dests))
    if "scp" in groups:
        setup_sshd(ctx)
    makers = {"file": lambda: make_file(ctx), "tree": lambda: make_tree(ctx, ctx.files),
              "many": lambda: make_many(ctx, args.many_files, ctx.many_size)}
    return [makers[n]() for n in names], dests


def setup_sshd(ctx):
    """A private sshd for scp: its own config, host key and authorized key in the work dir; the
    system's /etc/ssh and root's ~/.ssh are not used. Started per run on a free loopback port."""
    d = ctx.work / "ssh"
    d.mkdir(mode=0o700)
    for name in ("host_ed25519", "id_ed25519"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"xfer-bench-{name}",
                        "-f", d / name], check=True)
    (d / "authorized_keys").write_text((d / "id_ed25519.pub").read_text())
    ctx.sshd = sshd_binary()
    ctx.sshd_conf = d / "sshd_config"
    ctx.sshd_conf.write_text("\n".join([
        f"HostKey {d}/host_ed25519", f"PidFile {d}/sshd.pid", f"AuthorizedKeysFile {d}/authorized_keys",
        "PermitRootLogin prohibit-password", "PubkeyAuthentication yes", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", "UseDNS no", "PrintMotd no",
        "X11Forwarding no", "AllowTcpForwarding no", "LogLevel ERROR",
        "Subsystem sftp /usr/lib/openssh/sftp-server", ""]))
    ctx.ssh_opts = ["-i", d / "id_ed25519", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                    "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]
    # sshd insists on its privilege separation folder; make it if this system never ran an sshd.
    for folder in ("/run/sshd", os.path.expanduser("~root/.ssh")):  # ssh may create ~/.ssh
        if not os.path.exists(folder):
            MADE_DIRS.append(folder)
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    check = subprocess.run([ctx.sshd, "-t", "-f", ctx.sshd_conf], capture_output=True, text=True)
    if check.returncode:
        ctx.sshd_error = f"sshd -t: {check.stderr.strip()}"


def write_random(path, size):
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for left in range(size, 0, -16 * MIB):
            block = os.urandom(min(left, 16 * MIB))
            h.update(block)
            f.write(block)
    return h.hexdigest()


def make_file(ctx):
    w = argparse.Namespace(name="file", src=ctx.src_dir / "bench.bin", size=ctx.size, files=1,
                           verify=verify_file, label=f"file {human(ctx.size)}")
    w.timeout = 60 + w.size / (10 * MIB)  # generous: 10 MiB/s is far below any sane tool
    print(f"writing {human(w.size)} of random bytes to {w.src} ...", flush=True)
    w.sha = write_random(w.src, w.size)
    return w


def make_many(ctx, count, fsize):
    """COUNT files of FSIZE random bytes in one folder: many/f000 .. many/fNNN."""
    w = argparse.Namespace(name="many", src=ctx.src_dir / MANY_NAME, files=count, size=count * fsize,
                           verify=verify_tree, label=f"many {count} x {human(fsize)}")
    print(f"writing {count} files of {human(fsize)} of random bytes to {w.src}/ ...", flush=True)
    w.src.mkdir()
    width = max(3, len(str(count - 1)))
    digests = [write_random(w.src / f"f{i:0{width}d}", fsize) for i in range(count)]
    w.manifest = walk_tree(w.src)
    w.sha = hashlib.sha256("".join(digests).encode()).hexdigest()
    w.timeout = 60 + w.size / (10 * MIB) + count / 100
    return w


def make_tree(ctx, files):
    """FILES files of 1 ..= 16 KiB random bytes (seeded: the same tree every time) in 100 folders
    two levels deep (TREE/d00/d00 .. TREE/d09/d09, consecutive files per folder), plus two empty
    folders: TREE/empty and TREE/d05/e0/e1 (e0 holds only e1)."""
    w = argparse.Namespace(name="tree", src=ctx.src_dir / TREE_NAME, files=files,
                           verify=verify_tree, label=f"tree {files} files")
    leaves = [f"d{a:02d}/d{b:02d}" for a in range(10) for b in range(10)]
    for d in leaves + ["empty", "d05/e0/e1"]:
        os.makedirs(w.src / d)
    rng = random.Random(TREE_SEED)
    width = max(4, len(str(files - 1)))
    digests, w.size = {}, 0
    for i in range(files):
        rel = f"{leaves[i * len(leaves) // files]}/f{i:0{width}d}"
        data = rng.randbytes(rng.randint(1, TREE_MAX_FILE))
        Path(w.src, rel).write_bytes(data)
        digests[rel] = hashlib.sha256(data).digest()
        w.size += len(data)
    w.manifest = walk_tree(w.src)  # what every receiver must recreate under DEST/TREE_NAME
    w.dirs = sum(v == "dir" for v in w.manifest.values())
    # One digest for the whole tree (paths and contents): equal across runs and machines.
    w.sha = hashlib.sha256(b"".join(f"{rel}\0".encode() + digests[rel] for rel in sorted(digests))).hexdigest()
    # 60 s + 1 s per 10 MiB like the file, plus 10 ms per file: generous for any per-file cost.
    w.timeout = 60 + w.size / (10 * MIB) + files / 100
    w.label = f"tree {files} files ({w.size / 1e6:.0f} MB)"
    print(f"wrote tree {w.src}: {files} files ({w.size / 1e6:.1f} MB, {w.size / MIB:.1f} MiB) "
          f"in {w.dirs} folders, tree digest {w.sha[:16]}", flush=True)
    return w


def make_cases(w, d, first_dest, want, chunks, xf):
    """The cases of one workload x destination, in table order. want(name, group) applies --tools.
    xf: what the xfer binaries can do: hash (--hash), secure (this xfer is v5+: its cases run
    encrypted), twins (each xfer case gets an INSECURE twin right after it), base (None without
    --baseline, else the baseline's hash and secure: every xfer case and insecure twin gets a BASE
    twin that runs the baseline binary in the same mode; its blake3 twins only if the baseline has
    --hash, and the twins of encrypted cases only if it has the secure channel)."""
    folder = w.name != "file"
    nc = "tar|nc" if folder else "nc"
    xfer_runs = [("xfer", {}), ("xfer-cached", dict(cached=True))]
    if xf.hash:
        xfer_runs += [("xfer-blake3", dict(hash="blake3")), ("xfer-blake3-cached", dict(cached=True, hash="blake3"))]
    if not folder:
        xfer_runs += [(f"xfer-chunk-{n}", dict(chunk=n)) for n in chunks]
        # --streams-cases: the big file over N connections (lanes) on loopback, where auto uses one.
        for n in xf.streams:
            xfer_runs += [(f"xfer-streams-{n}", dict(streams=n))]
            if xf.hash:
                xfer_runs += [(f"xfer-blake3-streams-{n}", dict(hash="blake3", streams=n))]
    # (prefix, mode): the case itself (encrypted if this xfer can), then its plaintext twin.
    modes = [("", "secure" if xf.secure else None)] + ([(INSECURE, "insecure")] if xf.secure and xf.twins else [])
    table = []
    for name, kw in xfer_runs:
        for prefix, mode in modes:
            table.append((prefix + name, "xfer", lambda c, w, kw=kw, mode=mode: run_xfer(c, w, mode=mode, **kw)))
        for prefix, mode in modes if xf.base else ():
            if "hash" in kw and not xf.base.hash or mode == "secure" and not xf.base.secure or "streams" in kw:
                continue
            # Plaintext in the baseline's terms: --insecure from v5 on, no option before.
            bmode = mode if mode == "secure" else "insecure" if xf.base.secure else None
            table.append((BASE + prefix + name, "xfer",
                          lambda c, w, kw=kw, bmode=bmode: run_xfer(c, w, base=True, mode=bmode, **kw)))
    table += [(nc, "nc", run_tar_nc if folder else run_nc), (nc + "+sha256sum", "nc", run_nc_sha),
              ("rsync", "rsync", run_rsync), ("scp", "scp", run_scp)]
    if not folder and d.disk:
        table.append(("dd", "ref", run_dd))
    if not folder and d is first_dest:  # local hashing speed; the destination plays no part
        table.append(("sha256sum", "ref", run_sha256sum))
        if xf.floor:
            table += [("floor-sha256", "ref", lambda c, w: run_floor(c, w, "sha256")),
                      ("floor-blake3", "ref", lambda c, w: run_floor(c, w, "blake3"))]
    return [argparse.Namespace(name=name, group=group, fn=fn, w=w, d=d, id=f"{w.name}/{d.name}/{name}",
                               check=None if name == "sha256sum" or name.startswith("floor-") else w.verify)
            for name, group, fn in table
            # The hash floor goes with xfer's cases: their ratio to it is one of the targets.
            if want(plain(name), group) or name.startswith("floor-") and want("xfer", "xfer")]


# ---------------------------------------------------------------- running and reporting

def use_dest(ctx, d, w):
    ctx.dest, ctx.dname, ctx.disk = d.path, d.name, d.disk
    ctx.timeout = w.timeout * (2 if d.disk else 1)


def attempt(ctx, w, fn, log_name, check=None, full=False):
    """One run of fn with a deadline, checked with check(ctx, w, full). Raises RunError with the
    end of the run's stderr log; a failed run leaves none of its processes behind."""
    ctx.log = open(ctx.work / re.sub(r"[/|+]", "-", log_name), "w+b")
    fired = threading.Event()
    timer = threading.Timer(ctx.timeout, lambda: (fired.set(), kill_live()))  # a hung run is killed, then reported
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
        why = f"timed out after {ctx.timeout:.0f} s; " if fired.is_set() else ""
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
         "cpu_s_per_gib": statistics.median(r["cpu"] for r in runs) / (w.size / 2**30),
         "median_cpu_send_s": statistics.median(r["cpu_send"] for r in runs),
         "median_cpu_recv_s": statistics.median(r["cpu_recv"] for r in runs),
         "max_rss_send_mib": max(r["rss_send_kib"] for r in runs) / 1024,
         "max_rss_recv_mib": max(r["rss_recv_kib"] for r in runs) / 1024}
    if w.name != "file":
        s["files_per_s"] = w.files / med
    return s


def add_ratios(cases, summaries, twin=None, runs=None, insecure=None):
    """x_nc, x_rsync, x_scp: the case's median over that peer's median in the same workload and
    destination (for folders nc is tar|nc). With --baseline (twin: case id -> its BASE twin's id),
    also x_base and x_base_cpu for each xfer case that has a twin: its median wall / CPU seconds
    over the twin's (None if either failed), and x_base_paired: the median over reps of this run's
    wall / the twin's run of the same rep (they ran back to back, so slow drift cancels). The same
    as x_insecure, x_insecure_paired and x_insecure_cpu (plus x_insecure_cpu_send and
    x_insecure_cpu_recv, each side's CPU) for each encrypted case with an INSECURE twin (insecure:
    case id -> its twin's id)."""
    def versus(s, cid, ref_id, key):
        ref = summaries.get(ref_id)
        ratio = lambda a, b: a / b if ref and b else None
        s[f"x_{key}"] = ratio(s["median_s"], ref and ref["median_s"])
        s[f"x_{key}_cpu"] = ratio(s["median_cpu_s"], ref and ref["median_cpu_s"])
        ref_wall = {r["rep"]: r["wall"] for r in runs[ref_id]} if ref else {}
        paired = [r["wall"] / ref_wall[r["rep"]] for r in runs[cid] if r["rep"] in ref_wall]
        s[f"x_{key}_paired"] = statistics.median(paired) if paired else None
        return ref, ratio

    for c in cases:
        if s := summaries.get(c.id):
            for peer in ("nc", "rsync", "scp"):
                ref = summaries.get(f"{c.w.name}/{c.d.name}/{'tar|nc' if peer == 'nc' and c.w.name != 'file' else peer}")
                s[f"x_{peer}"] = s["median_s"] / ref["median_s"] if ref else None
            if twin and c.id in twin:
                versus(s, c.id, twin[c.id], "base")
            if insecure and c.id in insecure:
                ref, ratio = versus(s, c.id, insecure[c.id], "insecure")
                for side in ("send", "recv"):
                    s[f"x_insecure_cpu_{side}"] = ratio(s[f"median_cpu_{side}_s"], ref and ref[f"median_cpu_{side}_s"])


def print_table(sections, cases, summaries, errors, skipped, baseline=False, insecure=False):
    wide = max([20] + [len(c.name) + 1 for c in cases])  # room for base:insecure:xfer-blake3-cached
    head = (f"{'case':<{wide}}{'n':>3}{'median s':>9}{'min':>8}{'max':>8}{'MB/s':>8}{'CPU s':>7}{'CPU/GiB':>8}"
            f"{'RSS snd':>9}{'RSS rcv':>9}{'x nc':>7}{'x rsync':>8}{'x scp':>7}"
            + (f"{'x insec':>8}" if insecure else "") + (f"{'x base':>8}" if baseline else ""))
    fmt = lambda v: "-" if v is None else f"{v:.2f}"
    for w, d in sections:
        print(f"\n{w.label} -> {d.name} ({d.parent}, {d.fstype}{', made durable' if d.disk else ''})")
        print(head + "\n" + "-" * len(head))
        mine = [c for c in cases if c.w is w and c.d is d]
        for c in mine:
            if s := summaries.get(c.id):
                print(f"{c.name:<{wide}}{s['n']:>3}{s['median_s']:>9.3f}{s['min_s']:>8.3f}{s['max_s']:>8.3f}"
                      f"{s['mb_per_s']:>8.0f}{s['median_cpu_s']:>7.2f}{s['median_cpu_s'] / (w.size / 2**30):>8.2f}"
                      f"{s['max_rss_send_mib']:>9.1f}"
                      f"{s['max_rss_recv_mib']:>9.1f}{fmt(s['x_nc']):>7}{fmt(s['x_rsync']):>8}{fmt(s['x_scp']):>7}"
                      + (f"{fmt(s.get('x_insecure')):>8}" if insecure else "")
                      + (f"{fmt(s.get('x_base')):>8}" if baseline else ""))
        for c in mine:
            if c.id in errors:
                print(f"{c.name:<{wide}}FAILED: {errors[c.id]}")
        xfer, dd = summaries.get(f"file/{d.name}/xfer"), summaries.get(f"file/{d.name}/dd")
        if w.name == "file" and xfer and dd:
            print(f"xfer / dd = {xfer['median_s'] / dd['median_s']:.2f} (the issue's target for xfer to disk: <= 1.10)")
    for what, why in skipped.items():
        print(f"skipped {what}: {why}")
    print("n = runs (reps); MB = 10^6 bytes; RSS in MiB (peak over runs); CPU = user+sys of sender+receiver, median;\n"
          "CPU/GiB = that CPU per GiB moved (2^30 bytes of the workload): the CPU a transfer leaves for other work.\n"
          "x nc / x rsync / x scp = this median / that peer's median in the same section (below 1 = faster);\n"
          "for folders nc is tar|nc. rsync and scp receivers = the daemon (rsync --daemon, a private sshd)\n"
          "incl. its per-connection forks (a fresh daemon per run). tar|nc and nc+sha256sum sides are sh\n"
          "pipelines (CPU of all their tools, RSS of the largest). disk: durable before the clock stops\n"
          "(xfer itself, rsync --fsync, nc/scp + sync, dd conv=fsync).")
    if insecure:
        print("xfer cases run encrypted (protocol v5 and later: a code handshake, AES-256-GCM records); insecure: twins\n"
              "run both sides with --insecure (plaintext, sendfile). x insec = this median / its insecure: twin's.")
    if baseline:
        print("x base = this median / the median of its base: twin (the --baseline binary on both sides).")


def print_baseline(sections, cases, summaries, errors, twin, limit=1.05, key="base"):
    """The comparison with --baseline (key "base"), or of the encrypted cases with their insecure:
    twins (key "insecure"): per xfer case that has a twin, both medians, the ratio (wall), the
    paired ratio, x CPU (and with "insecure" each side's CPU ratio); the cases over limit are
    marked, and the worst is named at the end."""
    insec = key == "insecure"
    a, b_ = ("enc s", "insec s") if insec else ("new s", "base s")
    wide = max([21] + [len(c.name) + 1 for c in cases if c.id in twin])
    head = (f"{'section':<12}{'case':<{wide}}{'n':>5}{a:>9}{b_:>9}{'x ' + key[:5]:>8}{'x pair':>8}{'x CPU':>7}"
            + (f"{'x CPUs':>7}{'x CPUr':>7}" if insec else "") + f"{'min/min':>8}")
    if insec:
        print(f"\nencrypted vs insecure (x insec = encrypted median / insecure: twin's median, marked * when > "
              f"{limit:.2f};\nx pair = median over reps of encrypted run / insecure run of the same rep; x CPU = median "
              f"CPU s / the twin's,\nx CPUs / x CPUr the same for the sender / receiver alone; min/min = fastest / fastest)")
    else:
        print(f"\nvs baseline (x base = new median / base median, marked * when > {limit:.2f}; x pair = median over reps\n"
              f"of new run / base run of the same rep; x CPU = median CPU s / base's; min/min = fastest / fastest)")
    print(f"{head}\n" + "-" * len(head))
    ratios = []
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    for w, d in sections:
        for c in cases:
            if c.w is not w or c.d is not d or c.id not in twin:
                continue
            sec = f"{w.name}/{d.name}"
            s, b = summaries.get(c.id), summaries.get(twin[c.id])
            if not (s and b):
                who = ("encrypted", "insecure") if insec else ("new", "base")
                why = (errors.get(c.id) and f"{who[0]} failed" or errors.get(twin[c.id]) and f"{who[1]} failed"
                       or "no runs")
                print(f"{sec:<12}{c.name:<{wide}}  -: {why}")
                continue
            x = s[f"x_{key}"]
            ratios.append((x, c.id))
            print(f"{sec:<12}{c.name:<{wide}}{str(s['n']) + '/' + str(b['n']):>5}{s['median_s']:>9.3f}{b['median_s']:>9.3f}"
                  f"{x:>8.3f}{fmt(s[f'x_{key}_paired'], '>8.3f')}{fmt(s[f'x_{key}_cpu'], '>7.2f')}"
                  + (f"{fmt(s['x_insecure_cpu_send'], '>7.2f')}{fmt(s['x_insecure_cpu_recv'], '>7.2f')}" if insec else "")
                  + f"{s['min_s'] / b['min_s']:>8.3f}{' *' if x > limit else ''}")
    if ratios:
        over = [cid for x, cid in ratios if x > limit]
        worst = max(ratios)
        print(f"{len(ratios)} pairs; geometric mean x {key} {statistics.geometric_mean([x for x, _ in ratios]):.3f}; "
              f"worst {worst[1]} {worst[0]:.3f}; {len(over)} over {limit:.2f}" + (f": {', '.join(over)}" if over else ""))


def check_targets(sections, summaries):
    """The issue's speed targets (TARGETS) per destination: encrypted median / insecure: median of
    the same run. Returns one dict per target that could be measured (for the JSON); prints them."""
    out = []
    for w, d in sections:
        for wl, case, limit, what in TARGETS:
            s = summaries.get(f"{w.name}/{d.name}/{case}")
            if w.name != wl or not s or s.get("x_insecure") is None:
                continue
            x = s["x_insecure"]
            twin = summaries[f"{w.name}/{d.name}/{INSECURE}{case}"]
            scale = (w.name == "file" and w.size != 1 << 30) or (w.name == "tree" and w.files != 10_000)
            out.append({"section": f"{w.name}/{d.name}", "case": case, "target": what, "limit": limit,
                        "workload": w.label, "n": s["n"], "encrypted_median_s": s["median_s"],
                        "insecure_median_s": twin["median_s"], "x_insecure": x,
                        "x_insecure_paired": s.get("x_insecure_paired"), "met": x <= limit,
                        "met_paired": None if s.get("x_insecure_paired") is None else s["x_insecure_paired"] <= limit,
                        "at_target_size": not scale})
    if out:
        print("\ntargets (issue 12: encrypted median / insecure: median, same run)")
        for t in out:
            paired = "-" if t["x_insecure_paired"] is None else f"{t['x_insecure_paired']:.3f}"
            print(f"  {t['section']:<10} {t['case']:<12} {t['encrypted_median_s']:.3f} s / {t['insecure_median_s']:.3f} s"
                  f" = {t['x_insecure']:.3f} (paired {paired}, n {t['n']}) <= {t['limit']:.2f}: "
                  f"{'met' if t['met'] else 'NOT MET'}   [{t['target']}"
                  + ("" if t["at_target_size"] else f"; measured on {t['workload']}") + "]")
    return out


def check_targets14(sections, summaries):
    """Issue 14's targets (TARGETS14): the default (encrypted) case's median over a reference's
    median in the same run (the hash floor is measured once, in the first destination's section).
    Returns one dict per target that could be measured (for the JSON); prints them."""
    out = []
    for w, d in sections:
        for wl, case, ref, limit, what in TARGETS14:
            s = summaries.get(f"{w.name}/{d.name}/{case}")
            r = summaries.get(f"{w.name}/{d.name}/{ref}") or next(
                (v for k, v in summaries.items() if k.startswith(f"{w.name}/") and k.endswith(f"/{ref}")), None)
            if w.name != wl or not s or not r:
                continue
            x = s["median_s"] / r["median_s"]
            scale = (w.name == "file" and w.size != 1 << 30) or (w.name == "tree" and w.files != 10_000)
            out.append({"section": f"{w.name}/{d.name}", "case": case, "reference": ref, "target": what,
                        "at_target_size": not scale,
                        "limit": limit, "workload": w.label, "n": s["n"], "median_s": s["median_s"],
                        "reference_median_s": r["median_s"], "ratio": x, "met": x <= limit,
                        "cpu_s_per_gib": s["median_cpu_s"] / (w.size / 2**30)})
    if out:
        print("\ntargets (issue 14: the default, encrypted case's median / the reference's median, same run)")
        for t in out:
            print(f"  {t['section']:<10} {t['case']:<12} / {t['reference']:<13} {t['median_s']:.3f} s / "
                  f"{t['reference_median_s']:.3f} s = {t['ratio']:.3f} <= {t['limit']:.2f}: "
                  f"{'met' if t['met'] else 'NOT MET'}   [{t['target']}; CPU {t['cpu_s_per_gib']:.2f} s/GiB"
                  + ("" if t["at_target_size"] else f"; measured on {t['workload']}") + "]")
    return out


def csv_rows(cases, runs, summaries, errors, baseline=False, insecure=False):
    """One row per run (rep = 1, 2, ...) and one summary row per case (rep = 'median', with min,
    max, MB/s and the ratios), also for failed cases (with the error). insecure: x_insecure,
    x_insecure_paired and x_insecure_cpu columns, baseline: x_base, x_base_paired and x_base_cpu
    columns, before error."""
    cols = ["workload", "dest", "case", "rep", "wall_s", "min_s", "max_s", "mb_per_s", "cpu_s", "cpu_send_s",
            "cpu_recv_s", "rss_send_mib", "rss_recv_mib", "x_nc", "x_rsync", "x_scp",
            *(["x_insecure", "x_insecure_paired", "x_insecure_cpu"] if insecure else []),
            *(["x_base", "x_base_paired", "x_base_cpu"] if baseline else []), "error"]
    rows = []
    for c in cases:
        base = {"workload": c.w.name, "dest": c.d.name, "case": c.name}
        for r in runs[c.id]:
            rows.append({**base, "rep": r["rep"], "wall_s": r["wall"], "cpu_s": r["cpu"], "cpu_send_s": r["cpu_send"],
                         "cpu_recv_s": r["cpu_recv"], "rss_send_mib": r["rss_send_kib"] / 1024,
                         "rss_recv_mib": r["rss_recv_kib"] / 1024})
        s = summaries.get(c.id)
        row = {**base, "rep": "median", "error": errors.get(c.id, "")}
        if s:
            row.update(wall_s=s["median_s"], min_s=s["min_s"], max_s=s["max_s"], mb_per_s=s["mb_per_s"],
                       cpu_s=s["median_cpu_s"], cpu_send_s=s["median_cpu_send_s"],
                       cpu_recv_s=s["median_cpu_recv_s"], rss_send_mib=s["max_rss_send_mib"], rss_recv_mib=s["max_rss_recv_mib"],
                       x_nc=s["x_nc"], x_rsync=s["x_rsync"], x_scp=s["x_scp"],
                       x_base=s.get("x_base"), x_base_paired=s.get("x_base_paired"), x_base_cpu=s.get("x_base_cpu"),
                       x_insecure=s.get("x_insecure"), x_insecure_paired=s.get("x_insecure_paired"),
                       x_insecure_cpu=s.get("x_insecure_cpu"))
        rows.append(row)
    rnd = lambda v: round(v, 4) if isinstance(v, float) else ("" if v is None else v)
    return cols, [{k: rnd(row.get(k)) for k in cols} for row in rows]


GROUP_COLORS = {"xfer": "#1f77b4", "nc": "#ff7f0e", "rsync": "#2ca02c", "scp": "#d62728", "ref": "#7f7f7f"}
BASE_COLOR = "#9ecae1"  # the --baseline twins: a light xfer blue
INSECURE_COLOR = "#8c9fb3"  # the insecure: twins: a grey xfer blue (base:insecure: twins are hatched)


def draw_chart(data, png):
    """One grouped bar chart per workload x destination (rows x columns): median wall seconds per
    case, bars grouped and coloured by tool, min-max as error bars, log scale when the medians
    span more than 20x. Works from the JSON alone (see --chart)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sections = data["config"]["sections"]
    wls = list(dict.fromkeys(s["workload"] for s in sections))
    dns = list(dict.fromkeys(s["dest"] for s in sections))
    fig, axes = plt.subplots(len(wls), len(dns), figsize=(7.5 * len(dns), 4.2 * len(wls)), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for sec in sections:
        ax = axes[wls.index(sec["workload"])][dns.index(sec["dest"])]
        ax.set_visible(True)
        mine = [v for v in data["cases"].values() if v["workload"] == sec["workload"] and v["dest"] == sec["dest"]]
        ok = [v for v in mine if v["summary"]]
        xs, x, prev = [], 0.0, None
        for v in ok:  # a gap between tools: the bars of one tool form a group
            x += 1.0 if prev in (None, v["group"]) else 1.6
            xs.append(x)
            prev = v["group"]
        meds = [v["summary"]["median_s"] for v in ok]
        if ok:
            err = [[m - v["summary"]["min_s"] for m, v in zip(meds, ok)],
                   [v["summary"]["max_s"] - m for m, v in zip(meds, ok)]]
            color = lambda case, group: (BASE_COLOR if case.startswith(BASE) else INSECURE_COLOR
                                         if case.startswith(INSECURE) else GROUP_COLORS.get(group, "#999"))
            bars = ax.bar(xs, meds, yerr=err, capsize=3, color=[color(v["case"], v["group"]) for v in ok],
                          error_kw={"elinewidth": 1, "ecolor": "#333"})
            for bar, v in zip(bars, ok):
                if v["case"].startswith(BASE + INSECURE):
                    bar.set_hatch("//")
            ax.bar_label(bars, labels=[f"{m:.2f}" if m < 10 else f"{m:.1f}" for m in meds], fontsize=7, padding=2)
            ax.set_xticks(xs, [v["case"] for v in ok], rotation=35, ha="right", fontsize=8)
            if max(meds) / max(min(meds), 1e-6) > 20:
                ax.set_yscale("log")
            ax.margins(y=0.15)
        failed = [v["case"] for v in mine if not v["summary"]]
        if failed:
            ax.text(0.99, 0.97, "failed: " + ", ".join(failed), transform=ax.transAxes, ha="right", va="top",
                    fontsize=7, color="#b00")
        ax.set_title(sec["label"], fontsize=10)
        ax.set_ylabel("wall s, median (min-max)" + (", log" if ok and ax.get_yscale() == "log" else ""), fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    m = data["machine"]
    fig.suptitle(f"xfer loopback benchmark, {data['date']}: {m['host']}, {m['cpu']}, {m['nproc']} CPUs, "
                 f"sha_ni {'yes' if m['sha_ni'] else 'no'}, load {m['loadavg_at_start'][0]:.2f} at start", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(png, dpi=100)
    plt.close(fig)


def make_chart(plotter, json_path, png):
    try:
        if plotter is None:
            draw_chart(json.loads(json_path.read_text()), png)
        else:
            subprocess.run([plotter, __file__, "--chart", json_path, "--out", png], check=True)
        return True
    except Exception as e:  # the numbers are saved already; a chart problem must not lose them
        print(f"chart failed: {e}", flush=True)
        return False


def main(t_start):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=("file", "tree", "many", "both", "all"),
                    help="file (one big file), tree (many small files), many (100 x 10 MiB), "
                         "both (file and tree) or all (the default)")
    ap.add_argument("--dest", choices=("ram", "disk", "both"), default="both",
                    help="receive into RAM (tmpfs), onto disk (durable), or both (default)")
    ap.add_argument("--size", type=parse_size, help="file workload size, e.g. 256M, 1G (default 1G; 64M with --quick)")
    ap.add_argument("--files", type=int, help="files in the tree workload (default 10000; 500 with --quick)")
    ap.add_argument("--many-files", type=int, default=100, help="files in the many workload (default 100)")
    ap.add_argument("--many-size", type=parse_size, help="size of each of them (default 10M; 512K with --quick)")
    ap.add_argument("--reps", type=int, help="repetitions per case (default 3; 2 with --quick)")
    ap.add_argument("--budget", type=float,
                    help=f"seconds for the whole run, setup included: rep 1 runs every case, further reps only "
                         f"the cases that still fit, cheapest first (default {DEFAULT_BUDGET} unless --reps is "
                         f"given; 0 = no limit)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run of every case: all workloads (64 MiB, 500 files, 100 x 512 KiB), 2 reps")
    ap.add_argument("--tools", default="all",
                    help="comma-separated tool groups (xfer, nc, rsync, scp, ref) and/or case names "
                         f"({', '.join(CASE_NAMES)}, xfer-chunk-N); default all")
    ap.add_argument("--chunk-sizes", default="", help="extra xfer cases (file workload), e.g. 1024,65536,1M")
    ap.add_argument("--streams-cases", default="",
                    help="extra xfer cases (file workload) with --streams N (SHA-256 and BLAKE3), e.g. 2,4")
    ap.add_argument("--ram-dir", "--dest-dir", default="/dev/shm", help="RAM destination: a temp dir inside this")
    ap.add_argument("--disk-dir", default="/var/tmp", help="disk destination: a temp dir inside this")
    ap.add_argument("--out", help="JSON output (default bench/results/<date>-<host>.json; .csv and .png beside it)")
    ap.add_argument("--no-build", action="store_true", help="skip cargo build --release")
    ap.add_argument("--xfer", metavar="PATH",
                    help="the xfer binary to measure (default: target/release/xfer, built first unless --no-build; "
                         "with --xfer nothing is built)")
    ap.add_argument("--baseline", metavar="PATH",
                    help="another xfer binary to compare with: every xfer case gets a twin base:CASE, run right "
                         "next to it in every rep with this binary as sender and receiver; the table gets an "
                         "'x base' column (median / twin's median) and a comparison table follows it")
    ap.add_argument("--no-insecure-twins", action="store_true",
                    help="only the encrypted xfer cases: no insecure:CASE twin (--insecure on both sides) next "
                         "to each, so no 'x insec' column and no targets")
    ap.add_argument("--no-chart", action="store_true", help="no PNG (and no matplotlib install)")
    ap.add_argument("--chart", metavar="JSON", help="only draw the PNG of an earlier run's JSON (to --out or beside it)")
    args = ap.parse_args()
    if args.chart:
        draw_chart(json.loads(Path(args.chart).read_text()), args.out or Path(args.chart).with_suffix(".png"))
        return 0

    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if "all" in tools:
        tools = list(GROUPS)
    if bad := {t for t in tools if t not in GROUPS + CASE_NAMES and t.removeprefix("tar|") not in CASE_NAMES
               and not t.startswith(("xfer-chunk-", "xfer-streams-", "xfer-blake3-streams-"))}:
        ap.error(f"unknown tools: {', '.join(sorted(bad))}")
    want = lambda name, group: group in tools or name in tools or name.removeprefix("tar|") in tools
    chunks = [parse_size(c) for c in args.chunk_sizes.split(",") if c.strip()]
    workload = args.workload or "all"
    names = {"both": ["file", "tree"], "all": ["file", "tree", "many"]}.get(workload, [workload])
    dest_names = ["ram", "disk"] if args.dest == "both" else [args.dest]
    ctx = argparse.Namespace(size=args.size or (64 * MIB if args.quick else 1 << 30),
                             files=args.files or (500 if args.quick else 10_000),
                             many_size=args.many_size or (MIB // 2 if args.quick else 10 * MIB))
    if ctx.files < 1 or args.many_files < 1 or ctx.size < 1 or ctx.many_size < 1:
        ap.error("sizes and counts must be at least 1")
    reps = args.reps or (2 if args.quick else 3)
    budget = args.budget if args.budget is not None else (0 if args.reps else DEFAULT_BUDGET)

    info = machine_info()
    print(f"host {info['host']}: {info['nproc']} CPUs, {info['cpu']}, kernel {info['kernel']}, "
          f"sha_ni {'yes' if info['sha_ni'] else 'no'}, load {info['loadavg_at_start'][0]:.2f}", flush=True)
    # The tool groups with a wanted case: only those are installed and set up.
    groups = {g for n, g in CASE_GROUP.items() if want(n, g)} | ({"xfer"} if chunks and want("xfer-chunk-", "xfer") else set())
    skipped = {}  # what was not run and why (not an error)
    for g, why in ensure_peers(groups).items():
        skipped[f"{g} cases"] = why
        groups.discard(g)
    ctx.nc = nc_binary()
    hash_ok = False
    base_hash_ok = None  # None: no --baseline; else whether the baseline has --hash
    secure_ok = False    # this xfer is v5+ (encrypted by default, --insecure to opt out)
    base_secure_ok = None
    binaries = {}        # for the JSON: which binaries were measured
    send_help = lambda xfer: subprocess.run([xfer, "send", "--help"], capture_output=True, text=True).stdout
    has_hash = lambda xfer: "--hash" in send_help(xfer)
    has_secure = lambda xfer: "--insecure" in send_help(xfer) and "--code-file" in send_help(xfer)
    if args.baseline and "xfer" not in groups:
        print("note: --baseline ignored: no xfer case selected", flush=True)
    if "xfer" in groups:
        if args.xfer:
            ctx.xfer = str(Path(args.xfer).resolve())
        else:
            if not args.no_build and subprocess.run(["cargo", "build", "--release", "--bin", "xfer",
                                                     "--example", "hash-speed"], cwd=REPO).returncode:
                sys.exit("cargo build --release failed")
            ctx.xfer = str(Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"), "release", "xfer"))
        floor = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"), "release", "examples", "hash-speed")
        ctx.hash_speed = str(floor) if os.access(floor, os.X_OK) else None
        if not os.access(ctx.xfer, os.X_OK):
            sys.exit(f"{ctx.xfer} not found; build it or drop xfer from --tools")
        hash_ok = has_hash(ctx.xfer)
        if not hash_ok and (want("xfer-blake3", "xfer") or want("xfer-blake3-cached", "xfer")):
            skipped["xfer-blake3, xfer-blake3-cached"] = "this xfer has no --hash option (not in `xfer send --help`)"
            print(f"note: skipping xfer-blake3 and xfer-blake3-cached: {skipped['xfer-blake3, xfer-blake3-cached']}",
                  flush=True)
        secure_ok = has_secure(ctx.xfer)
        if not secure_ok:
            skipped[f"{INSECURE} twins"] = "this xfer has no secure channel (no --insecure in `xfer send --help`): its cases run in plaintext"
            print(f"note: no {INSECURE} twins: {skipped[f'{INSECURE} twins']}", flush=True)
        binaries["xfer"] = {"path": ctx.xfer, "sha256": file_sha256(ctx.xfer), "has_hash_option": hash_ok,
                            "secure_channel": secure_ok}
        if args.baseline or args.xfer:
            print(f"xfer: {ctx.xfer} (sha256 {binaries['xfer']['sha256'][:16]})", flush=True)
        if args.baseline:
            ctx.base_xfer = str(Path(args.baseline).resolve())
            if not os.access(ctx.base_xfer, os.X_OK):
                sys.exit(f"--baseline {ctx.base_xfer}: not an executable file")
            base_hash_ok = has_hash(ctx.base_xfer)
            base_secure_ok = has_secure(ctx.base_xfer)
            binaries["baseline"] = {"path": ctx.base_xfer, "sha256": file_sha256(ctx.base_xfer),
                                    "has_hash_option": base_hash_ok, "secure_channel": base_secure_ok}
            if secure_ok and not base_secure_ok:
                skipped[f"{BASE} twins of the encrypted cases"] = (
                    "the baseline xfer has no secure channel: compare insecure:CASE with base:insecure:CASE")
                print(f"note: no {BASE} twins for the encrypted cases: the baseline is plaintext only "
                      f"(its twins run next to the {INSECURE} cases)", flush=True)
            print(f"baseline: {ctx.base_xfer} (sha256 {binaries['baseline']['sha256'][:16]})", flush=True)
            if hash_ok and not base_hash_ok and (want("xfer-blake3", "xfer") or want("xfer-blake3-cached", "xfer")):
                skipped[f"{BASE}xfer-blake3, {BASE}xfer-blake3-cached"] = "the baseline xfer has no --hash option"
                print(f"note: no {BASE} twins for the blake3 cases: the baseline xfer has no --hash option", flush=True)
        if args.baseline and binaries["xfer"]["sha256"] == binaries["baseline"]["sha256"]:
            print("note: --xfer and --baseline are the same binary (an A/A run: x base should be ~1)", flush=True)
    plotter = False if args.no_chart else chart_python()
    workloads, dests = prepare(args, ctx, names, dest_names, groups)
    if "scp" in groups and getattr(ctx, "sshd_error", None):
        skipped["scp cases"] = ctx.sshd_error
        print(f"note: no scp cases: {ctx.sshd_error}", flush=True)
        groups.discard("scp")

    sections = [(w, d) for w in workloads for d in dests]
    xf = argparse.Namespace(hash=hash_ok, secure=secure_ok, twins=not args.no_insecure_twins,
                            streams=[int(n) for n in args.streams_cases.split(",") if n.strip()],
                            floor=getattr(ctx, "hash_speed", None),
                            base=None if base_hash_ok is None else argparse.Namespace(hash=base_hash_ok,
                                                                                      secure=base_secure_ok))
    cases = [c for w, d in sections for c in make_cases(w, d, dests[0], want, chunks, xf)
             if c.group in groups or c.name.startswith("floor-") and "xfer" in groups]
    if not cases:
        sys.exit("no cases to run")
    runs = {c.id: [] for c in cases}
    errors = {}
    # twin: case id -> its base: twin's id (--baseline); insecure: encrypted case id -> its
    # insecure: twin's id. A case and its twins (insecure:, base:, base:insecure:) are one group:
    # they run back to back (in reverse order in even reps, so none always goes first), and the
    # budget gives them the same number of reps.
    ids = {c.id for c in cases}
    twin, insecure = {}, {}
    mates = {c.id: [] for c in cases}  # case id -> the other ids of its group
    for c in cases:
        sec = f"{c.w.name}/{c.d.name}/"
        if c.name.startswith(BASE) and (orig := sec + c.name.removeprefix(BASE)) in ids:
            twin[orig] = c.id
        if c.name.removeprefix(BASE).startswith(INSECURE) and (
                enc := sec + c.name.replace(INSECURE, "", 1)) in ids:
            insecure[enc] = c.id
        if c.group == "xfer":
            mates[c.id] = [x.id for x in cases if x.id != c.id and x.w is c.w and x.d is c.d
                           and x.group == "xfer" and plain(x.name) == plain(c.name)]
    group_of = lambda c: f"{c.w.name}/{c.d.name}/{plain(c.name)}" if mates[c.id] else c.id

    # xfer's digest cache and keys live in the bench's work dir: never the user's, gone afterwards.
    # Sender and receiver have a config dir (identity key, pinned / trusted peers) each, and the
    # baseline gets its own cache and config dirs (their formats may differ). XFER_CODE is dropped:
    # the encrypted cases read the code from ctx.code_file, which the first receiver writes.
    os.environ["XDG_CACHE_HOME"] = str(ctx.work / "cache")
    os.environ.pop("XFER_CODE", None)
    ctx.code_file = ctx.work / "code"
    ctx.env = {side: dict(os.environ, XDG_CONFIG_HOME=str(ctx.work / f"config-{side}")) for side in ("send", "recv")}
    ctx.base_env = {side: dict(os.environ, XDG_CACHE_HOME=str(ctx.work / "cache-base"),
                               XDG_CONFIG_HOME=str(ctx.work / f"config-base-{side}")) for side in ("send", "recv")}
    # Pair once, untimed, per binary that runs encrypted: makes the code file and both identity
    # keys, so the first timed run does not pay for key generation (every timed encrypted run still
    # does a full code handshake: the receiver does not --remember senders).
    hello = argparse.Namespace(name="file", src=ctx.work / "hello.txt", size=6, timeout=60)
    hello.src.write_text("hello\n")
    for base in (False, True):
        mine = [c for c in cases if c.group == "xfer" and c.name.startswith(BASE) == base
                and not c.name.removeprefix(BASE).startswith(INSECURE)]
        if not mine or not (xf.secure if not base else xf.base.secure):
            continue
        use_dest(ctx, dests[0], hello)
        try:
            attempt(ctx, hello, lambda c, w: run_xfer(c, w, base=base, mode="secure"),
                    f"pairing{'-base' if base else ''}.log")
        except RunError as e:
            for c in mine:
                errors[c.id] = f"first encrypted send: {e}"
            print(f"  first encrypted send ({'baseline' if base else 'xfer'}) FAILED: {e}", flush=True)
        clear_dir(ctx.dest)
    for w in workloads:  # warm it: every timed xfer-cached / xfer-blake3-cached run is a repeat send
        warm = {}  # each -cached case (encrypted, insecure:, base:...) warms once, with its own options
        for c in cases:
            if c.w is w and c.group == "xfer" and plain(c.name).endswith("-cached") and c.id not in errors:
                warm.setdefault(c.name, []).append(c)
        for name, mine in warm.items():
            use_dest(ctx, dests[0], w)
            try:
                attempt(ctx, w, mine[0].fn, f"{w.name}-{name}-warm-up.log")
            except RunError as e:
                for c in mine:
                    errors[c.id] = f"warm-up: {e}"
                print(f"  warm-up {w.name}/{name} FAILED: {e}", flush=True)
            clear_dir(ctx.dest)
    print(f"{len(cases)} cases x {reps} reps: " + ", ".join(w.label for w in workloads) + "; into "
          + ", ".join(f"{d.name} {d.path} ({d.fstype})" for d in dests)
          + (f"; budget {budget:.0f} s" if budget else ""), flush=True)

    setup_s = time.monotonic() - t_start
    print(f"setup took {setup_s:.0f} s", flush=True)
    # Rep 1 runs every case. With a budget, reps 2.. go to the cases whose rep-1 time (plus its
    # overheads) still fits, cheapest first and rep 2 for all that fit before any rep 3: the slow
    # cases get fewer reps (the table's n column says how many). Runs stay round-robin.
    planned = {c.id: reps for c in cases}
    est = {}  # case id -> seconds its rep-1 run took, checks and daemon start included
    done = 0
    for rep in range(1, reps + 1):
        todo = [c for c in cases if c.id not in errors and planned[c.id] >= rep]
        if not todo:
            break
        if rep % 2 == 0:  # even reps: each group of twins runs in reverse, so none always goes first
            runs_of = []  # todo cut into runs of consecutive cases of one group
            for c in todo:
                if runs_of and group_of(runs_of[-1][-1]) == group_of(c):
                    runs_of[-1].append(c)
                else:
                    runs_of.append([c])
            todo = [c for run in runs_of for c in reversed(run)]
        t_rep = time.monotonic()
        committed = set()  # twins whose group passed the budget check in this rep
        for c in todo:
            if planned[c.id] < rep:
                continue  # cut for the budget together with its twins
            if rep > 1 and budget and c.id not in committed:
                mine = [m for m in mates[c.id] if m not in errors and planned[m] >= rep]
                if time.monotonic() - t_start + est[c.id] + sum(est[m] for m in mine) + RESERVE > budget:
                    for cid in [c.id, *mine]:
                        planned[cid] = rep - 1  # running late: no more reps for this one (and its twins)
                        print(f"  rep {rep} {cid:<30} skipped: over the budget", flush=True)
                    continue
                committed.update(mine)
            use_dest(ctx, c.d, c.w)
            clear_dir(ctx.dest)
            t_run = time.monotonic()
            try:
                r = attempt(ctx, c.w, c.fn, f"{c.id}-{rep}.log", c.check, full=not runs[c.id])
            except RunError as e:
                errors[c.id] = f"rep {rep}: {e}"
                print(f"  rep {rep} {c.id:<30} FAILED: {errors[c.id]}", flush=True)
                continue
            est.setdefault(c.id, time.monotonic() - t_run)
            runs[c.id].append({"rep": rep, **r})
            print(f"  rep {rep} {c.id:<30} {r['wall']:7.3f} s  cpu {r['cpu']:6.2f} s  "
                  f"rss {r['rss_send_kib'] / 1024:6.1f}/{r['rss_recv_kib'] / 1024:6.1f} MiB", flush=True)
        done = rep
        print(f"rep {rep} took {time.monotonic() - t_rep:.0f} s ({time.monotonic() - t_start:.0f} s so far)", flush=True)
        if rep == 1 and budget and reps > 1:
            left = budget - (time.monotonic() - t_start) - RESERVE
            alive = sorted((c for c in cases if c.id not in errors), key=lambda c: est[c.id])
            for c in alive:
                planned[c.id] = 1
            # A case and its twins (those alive) are one unit: they get the same reps.
            units, seen = [], set()
            for c in alive:
                if c.id not in seen:
                    unit = [c] + [x for x in alive if x.id in mates[c.id]]
                    seen.update(x.id for x in unit)
                    units.append(unit)
            units.sort(key=lambda u: sum(est[x.id] for x in u))
            for r in range(2, reps + 1):
                for unit in units:
                    cost = sum(est[x.id] for x in unit) * 1.1
                    if all(planned[x.id] == r - 1 for x in unit) and cost <= left:
                        for x in unit:
                            planned[x.id] = r
                        left -= cost
            if any(planned[c.id] < reps for c in alive):
                print(f"budget {budget:.0f} s: " + "; ".join(
                    f"{n} rep{'s' if n > 1 else ''} for " + (f"all {len(got)} cases" if len(got) == len(alive) else
                                                             f"{len(got)} cases" if n == reps else ", ".join(got))
                    for n in range(reps, 0, -1) if (got := [c.id for c in alive if planned[c.id] == n]))
                      + " (--budget 0 or --reps N: every case gets every rep)", flush=True)
    for d in dests:
        clear_dir(d.path)

    summaries = {c.id: summarize(runs[c.id], c.w) for c in cases if runs[c.id] and c.id not in errors}
    add_ratios(cases, summaries, twin, runs, insecure)
    print_table(sections, cases, summaries, errors, skipped, baseline=base_hash_ok is not None,
                insecure=bool(insecure))
    if twin:
        print_baseline(sections, cases, summaries, errors, twin)
    if insecure:
        print_baseline(sections, cases, summaries, errors, insecure, limit=1.25, key="insecure")
    targets = check_targets(sections, summaries)
    targets14 = check_targets14(sections, summaries)

    now = datetime.datetime.now()
    out = Path(args.out or REPO / "bench" / "results" / f"{now:%Y-%m-%dT%H%M%S}-{info['host']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    wl = {w.name: w for w in workloads}
    config = {"workloads": names, "dests": {d.name: {"dir": str(d.parent), "fstype": d.fstype} for d in dests},
              "sections": [{"workload": w.name, "dest": d.name, "label": f"{w.label} -> {d.name} ({d.fstype})"}
                           for w, d in sections],
              "size": ctx.size if "file" in wl else None, "reps": reps, "reps_done": done, "budget_s": budget,
              "setup_s": setup_s,
              "tools": tools, "chunk_sizes": chunks, "xfer_has_hash_option": hash_ok,
              "binaries": binaries or None,
              "xfer_modes": {"default": "encrypted" if secure_ok else "plaintext (no secure channel)",
                             "insecure_twins": bool(insecure),
                             "encrypted": "recv --code-file WORK/code, send --code-file WORK/code; each side its "
                                          "own XDG_CONFIG_HOME in WORK; no --remember: a code handshake per send",
                             "insecure": "--insecure on both sides"} if "xfer" in groups else None,
              "source_sha256": wl["file"].sha if "file" in wl else None,
              "durability_on_disk": {"xfer": "its own (fsync of a file, syncfs for a batch)", "rsync": "--fsync",
                                     "nc": "sync FILE / sync -f DIR after the copy, on the receiver",
                                     "nc+sha256sum": "as nc, before the receiver's sha256sum",
                                     "scp": "sync FILE / sync -f DIR after scp, on the sender",
                                     "dd": "conv=fsync"}}
    if "many" in wl:
        config["many"] = {"files": args.many_files, "file_size": ctx.many_size, "bytes": wl["many"].size,
                          "digest_of_sha256s": wl["many"].sha}
    if "tree" in wl:
        t = wl["tree"]
        config["tree"] = {"files": t.files, "dirs": t.dirs, "bytes": t.size, "seed": TREE_SEED,
                          "max_file": TREE_MAX_FILE, "tree_sha256": t.sha,
                          "layout": f"{TREE_NAME}/dNN/dNN/fNNNN (100 folders) + {TREE_NAME}/empty, {TREE_NAME}/d05/e0/e1"}
    total = time.monotonic() - t_start
    data = {
        "date": now.isoformat(timespec="seconds"), "machine": info, "config": config,
        "versions": {"xfer_git": version(["git", "describe", "--always", "--dirty"]),
                     "netcat": version(["dpkg-query", "-W", "-f=${Version}\n", "netcat-openbsd"]),
                     "rsync": version(["rsync", "--version"]),
                     "openssh": version(["ssh", "-V"], stderr=True) if "scp" in groups else None,
                     "tar": version(["tar", "--version"]), "coreutils": version(["sha256sum", "--version"])},
        "cases": {c.id: {"workload": c.w.name, "dest": c.d.name, "case": c.name, "group": c.group,
                         "runs": runs[c.id], "summary": summaries.get(c.id), "error": errors.get(c.id)}
                  for c in cases},
        "targets": targets, "targets14": targets14, "skipped": skipped, "total_s": total,
    }
    out.write_text(json.dumps(data, indent=2) + "\n")
    cols, rows = csv_rows(cases, runs, summaries, errors, baseline=base_hash_ok is not None, insecure=bool(insecure))
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, cols)
        writer.writeheader()
        writer.writerows(rows)
    print(f"raw results: {out}\ncsv:         {out.with_suffix('.csv')}")
    if plotter is not False and make_chart(plotter, out, out.with_suffix(".png")):
        print(f"chart:       {out.with_suffix('.png')}")
    total = time.monotonic() - t_start
    print(f"total time {total:.0f} s ({int(total // 60)} min {total % 60:.0f} s)", flush=True)
    return 1 if errors else 0


def cleanup():
    # Kill every child we have: the tools, and anything re-parented to us as subreaper
    # (e.g. an rsync daemon's or sshd's fork if the daemon was killed first). Then remove temp dirs.
    kill_children()
    for d in TEMP_DIRS:
        shutil.rmtree(d, ignore_errors=True)
    for d in MADE_DIRS:
        try:
            os.rmdir(d)  # only if still empty
        except OSError:
            pass


if __name__ == "__main__":
    t_start = time.monotonic()
    # SIGTERM/SIGHUP become SystemExit so the finally below still removes daemons and temp files.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _: sys.exit(128 + signum))
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.exit("prctl(PR_SET_CHILD_SUBREAPER) failed; Linux is required")
    try:
        sys.exit(main(t_start))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        cleanup()
