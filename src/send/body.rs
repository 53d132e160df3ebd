//! Acting on one answered entry on the sender: an outcome the answer decides (already there,
//! refused, a folder created), or a body: `Body`, the bytes from the offset, and the file's
//! digest right behind it if the receiver has not had it yet.

use std::sync::mpsc;

use super::events::{Event, open_unchanged};
use super::handoff::KEEP_MAX;
use super::lanes::{SPLIT_MIN, SplitFile, auto_lanes, send_split};

/// How long the engine waits for the hashing thread before it sends what it has buffered.
const HASH_GRACE: std::time::Duration = std::time::Duration::from_millis(2);
use super::report::{EntryOutcome, beside};
use super::run::Run;
use crate::cache::Stamp;
use crate::error::Error;
use crate::protocol::{Answer, Body, EntryKind, Message, RejectCode, Withdraw, bounded_reason};
use crate::sanitize::{escape, peer_text};
use crate::transport::{BodyTap, FileError, FrameWriter, TAPPED_MIN_BODY};

impl Run<'_> {
    /// Acts on the next answered entry: records the outcome the answer decides, or sends its body
    /// and makes sure its digest follows it.
    pub(super) fn act(&mut self, inbox: &mpsc::Receiver<Event>, w: &mut FrameWriter) -> Result<(), Error> {
        let i = self.acted;
        self.acted += 1;
        let entry = &self.entries[i];
        let is_file = matches!(entry.kind, EntryKind::File { .. });
        self.acted_files += usize::from(is_file);
        let size = entry.size();
        let shown = entry.path.join("/");
        let outcome = match (&self.answers[i], &entry.kind) {
            // The receiver names the file in its folder (untrusted: it is only ever printed escaped).
            (Answer::Have { name }, _) => Some(EntryOutcome::AlreadyThere(beside(&entry.path, name))),
            // A folder answered Send was created by the receiver.
            (Answer::Send { .. }, EntryKind::Dir) => Some(EntryOutcome::Verified(shown.clone())),
            (Answer::Reject { code: RejectCode::Failed, reason }, _) => {
                Some(EntryOutcome::Failed(Error::RemoteFailed(peer_text(reason.clone()))))
            }
            (Answer::Reject { code, reason }, _) => {
                let name = escape(&shown);
                // A receiver's reason may begin by naming the entry, which the error already does.
                let reason = peer_text(reason.clone());
                let reason = match reason.strip_prefix(&format!("\"{name}\": ")) {
                    Some(rest) => rest.to_string(),
                    None => reason,
                };
                Some(EntryOutcome::Failed(Error::Rejected { name, code: *code, reason }))
            }
            (Answer::Send { .. }, EntryKind::File { .. }) => None,
            (Answer::Send { .. }, EntryKind::Stream { .. }) => {
                unreachable!("streams are sent by send::stream")
            }
        };
        self.done += 1;
        let n = self.entry_file[i];
        if let Some(o) = outcome {
            self.drop_kept(i);
            if is_file {
                // The hashing thread reads it itself, if it was keeping it for its body.
                self.handoff.release(n);
            }
            // Nothing moves for it: it is done (a file counts once its outcome is known).
            self.bar.skip(size);
            if is_file {
                self.bar.file_done();
            }
            if !self.local[i] {
                self.outcomes[i] = Some(o);
            }
            return Ok(());
        }
        let Answer::Send { offset } = self.answers[i] else { unreachable!("matched above") };
        self.owed[i] = true;
        self.owing += 1;
        self.offsets[i] = offset;
        self.bar.skip(offset);
        if self.entries.len() > 1 {
            self.bar.set_name(&shown);
        }
        let item = &self.items[i];
        let path = item.source.display().to_string();
        let stamp = item.file.expect("files have stamps");
        // A small file's bytes come from the hashing thread, which reads them once for both:
        // worth waiting for, as its digest is due by the end of its body anyway.
        if size <= KEEP_MAX && !self.local[i] {
            self.await_hashed(n, inbox, w)?;
        }
        let kept = self.kept[i].take();
        if let Some(bytes) = &kept {
            self.handoff.unkeep(bytes.len() as u64);
        }
        if let Some(bytes) = kept.filter(|_| !self.local[i]) {
            // Read and checked by the hashing thread: the bytes its digest is of go out.
            w.message(&Message::Body(Body { index: i as u32 }))
                .and_then(|()| w.data(&bytes[offset as usize..], self.opts.chunk_size))
                .map_err(|e| w.error("sending bodies", e.into()))?;
            self.bar.inc(size - offset);
            self.sent += size - offset;
            self.resumed += offset;
            return self.digest_due(n, inbox, w);
        }
        // Its bytes, if they come now, are not needed: its body reads the file.
        self.drop_kept(i);
        let opened = if self.local[i] {
            Err(Error::Usage("it could not be read".into()))
        } else {
            open_unchanged(&item.source, stamp)
        };
        let mut f = match opened {
            Ok(f) => f,
            Err(e) => {
                self.handoff.release(n);
                let reason = bounded_reason(e.to_string());
                self.local[i] = true;
                self.outcomes[i].get_or_insert(EntryOutcome::Failed(e));
                self.bar.skip(size - offset);
                let withdraw = Message::Withdraw(Withdraw { index: i as u32, reason });
                return w.message(&withdraw).map_err(|e| w.error("sending bodies", e.into()));
            }
        };
        if offset > 0 && self.entries.len() == 1 {
            let line = format!("xfer: resuming \"{}\" at byte {offset} of {size}", escape(&shown));
            self.progress.line(&line, false);
        }
        // A large body may go over several connections (`--streams`); the hashing thread then
        // reads the file itself.
        let lanes = lanes_for(self.opts.streams.unwrap_or_else(|| auto_lanes(self.rtt)), size - offset);
        let mut feed = None;
        let sent = if lanes > 1 {
            self.handoff.release(n);
            let split = SplitFile {
                index: i as u32,
                source: &item.source,
                stamp,
                range: (offset, size),
                lanes,
                peer: &self.peer,
                idle: self.opts.timeout,
                chunk: self.opts.chunk_size,
                told: self.told as u32,
            };
            send_split(w, &mut f, &split, self.bar).map(|joined| self.lanes_joined += joined)
        } else {
            w.message(&Message::Body(Body { index: i as u32 }))
                .map_err(|e| w.error("sending bodies", e.into()))?;
            // From its start on a secure channel, the hashing thread may hash what the body reads
            // instead of reading the file again (`handoff`).
            feed = if offset == 0 && w.is_sealed() && size >= TAPPED_MIN_BODY {
                self.handoff.claim(n)
            } else {
                self.handoff.release(n);
                None
            };
            let tap = feed.as_mut().map(|f| f as &mut dyn BodyTap);
            w.file_body(&mut f, (offset, size), self.opts.chunk_size, self.bar, tap)
        };
        match sent {
            Ok(()) => {}
            Err(FileError::Net(e)) => return Err(w.error("sending the body", e.into())),
            // The body cannot be completed: the connection is out of step, so it ends here.
            Err(FileError::Local(e)) => {
                // Ours, whatever the receiver then says about the short body.
                let context = format!("cannot read {path} (did it shrink while being sent?)");
                self.local[i] = true;
                self.outcomes[i] = Some(EntryOutcome::Failed(Error::io(context.clone(), e)));
                return Err(Error::io(context, std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
        self.sent += size - offset;
        self.resumed += offset;
        let unchanged = f.metadata().map(|m| Stamp::of(&m)).ok() == Some(stamp);
        if let Some(feed) = feed {
            feed.end(unchanged);
        }
        if !unchanged {
            let msg = format!("{path} changed while it was being sent; send it again");
            self.local[i] = true;
            self.outcomes[i] = Some(EntryOutcome::Failed(Error::Integrity(msg)));
        }
        self.digest_due(n, inbox, w)?;
        self.drop_kept(i);
        Ok(())
    }

    /// File `n`'s digest is due by the end of its body: waits for the hashing thread if need
    /// be, and sends it.
    fn digest_due(
        &mut self,
        n: usize,
        inbox: &mpsc::Receiver<Event>,
        w: &mut FrameWriter,
    ) -> Result<(), Error> {
        while self.told <= n {
            self.await_hashed(n, inbox, w)?;
            self.tell(w)?;
        }
        Ok(())
    }

    /// Takes events until the hashing thread has done file `n`. What is buffered goes out
    /// before a wait longer than [`HASH_GRACE`], not before each wait: a batch of small files
    /// waits for the hashing thread at every file, a few microseconds each.
    fn await_hashed(
        &mut self,
        n: usize,
        inbox: &mpsc::Receiver<Event>,
        w: &mut FrameWriter,
    ) -> Result<(), Error> {
        while self.hashed <= n {
            let event = match inbox.try_recv().or_else(|_| inbox.recv_timeout(HASH_GRACE)) {
                Ok(e) => Some(e),
                Err(_) => {
                    w.flush().map_err(|e| w.error("sending", e.into()))?;
                    self.wait(inbox, w)?
                }
            };
            if let Some(e) = event {
                self.take(e)?;
            }
        }
        Ok(())
    }

    /// Entry `i`'s kept bytes, if any, are not needed: their room goes back to the hashing thread.
    pub(super) fn drop_kept(&mut self, i: usize) {
        if let Some(bytes) = self.kept[i].take() {
            self.handoff.unkeep(bytes.len() as u64);
        }
    }
}

/// How many connections a body of `len` bytes goes over: `--streams`, for a body of at least
/// [`SPLIT_MIN`], and no more than it has parts.
fn lanes_for(streams: u8, len: u64) -> u8 {
    if streams <= 1 || len < SPLIT_MIN {
        return 1;
    }
    let parts = len.div_ceil(crate::protocol::SPLIT_CHUNK);
    u64::from(streams).min(parts) as u8
}
