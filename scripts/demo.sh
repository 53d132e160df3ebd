#!/usr/bin/env bash
# Builds xfer and moves a real file over loopback, encrypted and authenticated with a code: a
# receiver in a temporary folder, a sender, then a byte-for-byte comparison. Needs only cargo; cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --quiet
bin=$PWD/target/release/xfer
work=$(mktemp -d)
rpid=
cleanup() {
    [ -n "$rpid" ] && kill "$rpid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

mkdir "$work/downloads"
head -c 64M /dev/urandom > "$work/sample.bin"

# Keys of this demo stay in its folder, not in ~/.config/xfer.
export XDG_CONFIG_HOME="$work/config"
# Port 0: the receiver picks a free port and prints it as its first line on stdout. Its code goes
# to a file (mode 0600) that the sender reads: on a terminal, you would type it instead.
"$bin" recv --dir "$work/downloads" --listen 127.0.0.1:0 --code-file "$work/code" > "$work/recv.out" &
rpid=$!
for _ in $(seq 200); do
    grep -q '^listening on ' "$work/recv.out" 2>/dev/null && break
    sleep 0.05
done
addr=$(sed -n 's/^listening on //p' "$work/recv.out")
echo "demo: receiver $addr storing into $work/downloads"

"$bin" send "$work/sample.bin" "$addr" --code-file "$work/code"
sleep 0.2 # let the receiver's log line (stderr) land before ours
cmp "$work/sample.bin" "$work/downloads/sample.bin"
echo "demo: ok, the received file is identical ($(sha256sum < "$work/downloads/sample.bin" | cut -c1-16)...)"
