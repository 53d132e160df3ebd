//! Integration tests: the real `xfer` binary over loopback TCP, real files in temporary folders.
//! One test binary, so the crate and the binary are built once.

mod bridge;
mod util; // harness: spawn receivers, run senders, raw wire peers, random data, failure reports // raw peers over the secure channel: a proxy that pairs by code and seals their frames

mod cache; // the sender's digest cache: repeat sends skip hashing, changes never slip through
mod concurrency; // many senders at once; a stalled sender holds up no one; the busy limit
mod conversations; // random hostile conversations against one receiver: nothing unverified stored
mod disk; // bytes, blocks, inodes reserved before answering; partials bounded; small files nameless
mod existing; // identical file → already have it; different → keep both; --overwrite replaces
mod exit_codes; // every documented exit code, provoked for real
mod faults; // a proxy flips, trickles, stalls and cuts: nothing bad is stored, resume works
mod handoff; // a large first send reads its file once; the guarantees hold on that path
mod hashes; // --hash blake3: announced, verified with that algorithm, cached apart
mod hostile; // a raw peer speaking the wire format attacks the receiver
mod hostile_receiver; // a fake receiver lies to the sender: bad offsets, frames, answers, names
mod lanes; // --streams: a large file over several connections, raw parts, resumes after kills
mod load; // 64 senders at once; a flood of idle connections from one address
mod names; // names Linux allows arrive; what the target's file system cannot hold is refused alone
mod pipeline; // hashing overlaps sending: files are answered and stored as their digests come
mod pipes; // recv --once -o PATH and -o -, send - (stdin): one file to a path, to stdout, from a pipe
mod progress; // bars on a terminal (a pty from script(1)), none with --quiet or in a pipe
mod readme; // README's runnable examples, run as pasted
mod resume; // interrupted three ways, then resumed; other versions not reused
mod secure; // codes, pinned keys, downgrades, tampering, relays: the secure channel under attack
mod streaming; // answered before the digest when nothing could match; the digest after the body decides
mod timeouts; // silent peers on either side
mod transfer; // byte-for-byte equality across sizes and chunk sizes
mod tree; // folders and many files: identical trees, repeats send nothing, hostile manifests
