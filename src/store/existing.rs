//! Files already in the target folder, recognised by content: "already have it" answers, and
//! whether an entry needs its digest before it can be answered. Names given here are already
//! validated single components, looked up through a [`SafeDir`].

use std::io;
use std::time::Instant;

use indicatif::ProgressBar;

use super::safedir::{Kind, SafeDir};
use crate::hash::hash_reader_until;
use crate::protocol::{Digest, HashAlg};
use crate::sanitize::numbered_name;

/// How many keep-both names (`img (1).jpg` ... ) are tried before giving up.
pub const MAX_KEEP_BOTH: u32 = 9999;

/// If a file with this exact content is already stored as `name` or one of its keep-both
/// variants, returns the name it is stored under. Only same-size regular files are hashed, and
/// only until `deadline`: the sender is waiting for the reply, and a peer must not be able to make
/// the receiver read huge files for nothing. Past the deadline the answer is "not found", which
/// costs a resend (stored beside the old file), never a wrong "already have it". `bar` counts
/// the bytes hashed.
pub fn find_existing(
    dir: &SafeDir,
    name: &str,
    (size, alg, digest): (u64, HashAlg, &Digest),
    overwrite: bool,
    deadline: Instant,
    bar: &ProgressBar,
) -> io::Result<Option<String>> {
    let last = if overwrite { 0 } else { MAX_KEEP_BOTH };
    for n in 0..=last {
        let candidate = numbered_name(name, n);
        // Never follow a symlink, and never read a fifo or device the folder happens to contain.
        match dir.kind(&candidate)? {
            Kind::Missing => return Ok(None),
            Kind::File(len) if len == size => {
                // One this receiver may not read (its mode came from a sender) is not this content
                // as far as it can tell: the next name is tried.
                let Ok(file) = dir.open_read(&candidate) else { continue };
                bar.set_length(len);
                bar.set_position(0);
                match hash_reader_until(alg, file, bar, Some(deadline))? {
                    Some((d, _)) if &d == digest => return Ok(Some(candidate)),
                    Some(_) => {}
                    None => return Ok(None),
                }
            }
            Kind::File(_) | Kind::Other => {}
        }
    }
    Ok(None)
}

/// Whether a regular file of `size` bytes is stored as `name` or (unless `overwrite`) one of its
/// keep-both variants: only then can an entry be "already here", so only then is its digest
/// needed before the body.
pub fn same_size_exists(dir: &SafeDir, name: &str, size: u64, overwrite: bool) -> io::Result<bool> {
    let last = if overwrite { 0 } else { MAX_KEEP_BOTH };
    for n in 0..=last {
        match dir.kind(&numbered_name(name, n))? {
            Kind::Missing => return Ok(false),
            Kind::File(len) if len == size => return Ok(true),
            Kind::File(_) | Kind::Other => {}
        }
    }
    Ok(false)
}
