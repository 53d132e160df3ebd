//! The line manifests wait in while every transfer slot is taken.
//!
//! A sender that finds the receiver full is not refused: its manifest (when it is complete within
//! `PRE_SLOT_MANIFEST`) waits here, first come first served, and the sender is told how many wait
//! before it (`Queued { ahead }`) whenever that changes and at least every `QUEUE_TICK`. A slot
//! goes to the first manifest in line whose address is under its share of the slots, so one busy
//! host cannot hold the line for everyone else. Waiting costs a connection the receiver already
//! counts (`CONNECTIONS_PER_TRANSFER`, `PEER_SHARE`) and its small manifest, nothing more; after
//! `QUEUE_WAIT` in line the manifest is refused as busy.

use std::collections::VecDeque;
use std::io;
use std::net::IpAddr;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{PeerSlot, Shared, Slot, take_slot};

/// How often a waiting sender hears from the receiver (its position), at least.
pub const QUEUE_TICK: Duration = Duration::from_secs(1);

/// The longest a manifest waits in line for a slot before it is refused as busy.
pub(crate) const QUEUE_WAIT: Duration = Duration::from_secs(600);

/// Manifests waiting for a slot, in arrival order.
#[derive(Default)]
pub(super) struct Line {
    state: Mutex<State>,
    turn: Condvar,
}

#[derive(Default)]
struct State {
    next: u64,
    /// Tickets and their peer addresses (as `peer_key` counts them).
    waiting: VecDeque<(u64, IpAddr)>,
}

/// Why a manifest left the line without a slot.
pub(super) enum Left {
    /// No slot was free and this manifest may not wait (it is not complete yet).
    Full,
    /// It waited `QUEUE_WAIT`.
    TooLong,
    /// Its sender could not be told its position: it is gone.
    Gone(io::Error),
}

impl Line {
    /// A slot may have been freed: waiting manifests look again.
    pub(super) fn wake(&self) {
        self.turn.notify_all();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A transfer slot and one of `ip`'s share of them (`share`): at once when one is free and
    /// nobody who could take it waits before; else, if `may_wait`, after waiting in line, with
    /// `tell(ahead)` called when the position changes and at least every `QUEUE_TICK`.
    pub(super) fn take<'a>(
        &self,
        shared: &'a Shared,
        (ip, share): (IpAddr, usize),
        may_wait: bool,
        mut tell: impl FnMut(u32) -> io::Result<()>,
    ) -> Result<(Slot<'a>, PeerSlot<'a>), Left> {
        let max = shared.opts.max_transfers;
        let mut st = self.lock();
        let ticket = st.next;
        st.next += 1;
        st.waiting.push_back((ticket, ip));
        let since = Instant::now();
        let mut told: Option<(u32, Instant)> = None;
        loop {
            let pos = st.waiting.iter().position(|&(t, _)| t == ticket).expect("a ticket leaves only here");
            // Slots go in line order, skipping addresses that hold their whole share.
            let first = st.waiting.iter().position(|&(_, a)| shared.per_peer_transfers.count(a) < share);
            if first == Some(pos)
                && let Some(slot) = take_slot(&shared.transfers, max)
            {
                let mine = shared.per_peer_transfers.slot(ip, share).expect("counted under the line's lock");
                st.waiting.remove(pos);
                drop(st);
                // The next in line may be able to go too, and everyone behind moved up.
                self.wake();
                return Ok((slot, mine));
            }
            let leave = if !may_wait {
                Some(Left::Full)
            } else if since.elapsed() >= QUEUE_WAIT {
                Some(Left::TooLong)
            } else {
                None
            };
            let ahead = u32::try_from(pos).unwrap_or(u32::MAX);
            let due = told.is_none_or(|(a, at)| a != ahead || at.elapsed() >= QUEUE_TICK);
            if leave.is_none() && due {
                // Not under the lock: the write may block for as long as the sender lets it.
                drop(st);
                let said = tell(ahead);
                st = self.lock();
                if let Err(e) = said {
                    Self::leave(&mut st, ticket);
                    drop(st);
                    self.wake();
                    return Err(Left::Gone(e));
                }
                told = Some((ahead, Instant::now()));
                continue;
            }
            if let Some(why) = leave {
                Self::leave(&mut st, ticket);
                drop(st);
                self.wake();
                return Err(why);
            }
            let next_tell = told.map_or(Duration::ZERO, |(_, at)| QUEUE_TICK.saturating_sub(at.elapsed()));
            st = self
                .turn
                .wait_timeout(st, next_tell.max(Duration::from_millis(10)))
                .map_or_else(|e| e.into_inner().0, |r| r.0);
        }
    }

    fn leave(st: &mut State, ticket: u64) {
        st.waiting.retain(|&(t, _)| t != ticket);
    }
}
