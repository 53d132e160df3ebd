//! The code's guess budget: how many wrong codes a long-running receiver tolerates, how fast,
//! and from whom.
//!
//! A code handshake is a guess only at its last step (m3), and only a wrong one costs anything:
//! a guess takes a token from a bucket shared by all addresses ([`AUTH_BURST`], refilled one per
//! [`AUTH_REFILL`]) and one from its address's bucket ([`AUTH_PEER_BURST`], same refill; IPv6 by
//! /64); a right code gives both back. Handshakes abandoned before m3 cost nothing. After
//! [`AUTH_MAX_WRONG`] wrong codes the code is retired: a code this receiver made up is replaced
//! by a new one (shown again, and rewritten to `--code-file`), an operator's code stops working
//! until the receiver is restarted with another. README gives the bound this puts on guessing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::code::Code;

/// Wrong codes after which a code is retired.
pub const AUTH_MAX_WRONG: u32 = 100;
/// Time in which one token comes back to each bucket.
pub const AUTH_REFILL: Duration = Duration::from_secs(2);
/// Tokens of the shared bucket: guesses in a burst from everyone together.
pub const AUTH_BURST: u32 = 6;
/// Tokens of one address's bucket.
pub const AUTH_PEER_BURST: u32 = 3;
/// Addresses whose buckets are tracked; full buckets are forgotten first.
const TRACKED: usize = 4096;

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(cap: u32) -> Bucket {
        Bucket { tokens: f64::from(cap), at: Instant::now() }
    }

    fn refill(&mut self, cap: u32, now: Instant) {
        let add = now.duration_since(self.at).as_secs_f64() / AUTH_REFILL.as_secs_f64();
        self.tokens = (self.tokens + add).min(f64::from(cap));
        self.at = now;
    }
}

struct State {
    code: Option<Code>,
    wrong: u32,
    shared: Bucket,
    peers: HashMap<IpAddr, Bucket>,
}

/// What happens when a code is retired: a new code to show (and write), or nothing.
pub type Renew = Box<dyn Fn() -> Option<Code> + Send + Sync>;

pub struct Guard {
    state: Mutex<State>,
    renew: Renew,
}

impl Guard {
    /// `renew` is called when the code is retired; `Some` is the code that replaces it.
    pub fn new(code: Code, renew: Renew) -> Guard {
        let state =
            State { code: Some(code), wrong: 0, shared: Bucket::full(AUTH_BURST), peers: HashMap::new() };
        Guard { state: Mutex::new(state), renew }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The code in force, or `None` once retired for good.
    pub fn current_code(&self) -> Option<Code> {
        self.lock().code.clone()
    }

    /// Takes a token for one guess from `ip`; `false` when the budget is spent for now.
    pub fn take(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        let mut s = self.lock();
        s.shared.refill(AUTH_BURST, now);
        if s.peers.len() >= TRACKED && !s.peers.contains_key(&ip) {
            s.peers.retain(|_, b| {
                b.refill(AUTH_PEER_BURST, now);
                b.tokens < f64::from(AUTH_PEER_BURST)
            });
            if s.peers.len() >= TRACKED {
                return false;
            }
        }
        let peer = s.peers.entry(ip).or_insert_with(|| Bucket::full(AUTH_PEER_BURST));
        peer.refill(AUTH_PEER_BURST, now);
        if peer.tokens < 1.0 {
            return false;
        }
        if s.shared.tokens < 1.0 {
            return false;
        }
        s.shared.tokens -= 1.0;
        s.peers.get_mut(&ip).expect("inserted").tokens -= 1.0;
        true
    }

    /// Gives back the token of a guess that was right.
    pub fn refund(&self, ip: IpAddr) {
        let mut s = self.lock();
        s.shared.tokens = (s.shared.tokens + 1.0).min(f64::from(AUTH_BURST));
        if let Some(b) = s.peers.get_mut(&ip) {
            b.tokens = (b.tokens + 1.0).min(f64::from(AUTH_PEER_BURST));
        }
    }

    /// Counts a wrong code; the last one the budget allows retires the code.
    pub fn wrong(&self) {
        let mut s = self.lock();
        s.wrong += 1;
        if s.wrong >= AUTH_MAX_WRONG {
            s.wrong = 0;
            s.code = (self.renew)();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_limits_bursts_per_address_and_overall() {
        let g = Guard::new(Code::generate(), Box::new(|| None));
        let a: IpAddr = [127, 0, 0, 1].into();
        assert!((0..AUTH_PEER_BURST).all(|_| g.take(a)));
        assert!(!g.take(a), "one address gets its share, no more");
        let others: Vec<IpAddr> = (2..10).map(|i| IpAddr::from([127, 0, 0, i])).collect();
        let granted = others.iter().filter(|ip| g.take(**ip)).count() as u32;
        assert_eq!(granted, AUTH_BURST - AUTH_PEER_BURST, "the shared bucket bounds everyone");
        // A right code gives its token back.
        g.refund(a);
        assert!(g.take(a));
    }

    #[test]
    fn wrong_codes_retire_the_code() {
        let g = Guard::new(Code::generate(), Box::new(|| None));
        let first = g.current_code().unwrap();
        for _ in 0..AUTH_MAX_WRONG - 1 {
            g.wrong();
        }
        assert_eq!(g.current_code(), Some(first));
        g.wrong();
        assert_eq!(g.current_code(), None, "an operator's code stops working");
        let renewed = Guard::new(Code::generate(), Box::new(|| Some(Code::generate())));
        let before = renewed.current_code().unwrap();
        (0..AUTH_MAX_WRONG).for_each(|_| renewed.wrong());
        assert_ne!(renewed.current_code().unwrap(), before, "a generated code is replaced");
    }
}
