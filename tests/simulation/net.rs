//! The simulated network: TCP connections that deliver in order, late, or not at all.
//!
//! A connection carries messages both ways; each arrives no earlier than the step it was
//! given (a delay drawn per message) and never before one sent ahead of it on the same
//! direction (TCP's order). A reset is dropping the connection: whatever is in flight
//! either way is gone, and each side learns it at its next look.

use std::collections::VecDeque;

/// One direction of a connection: (step it arrives at, message).
#[derive(Debug)]
struct Pipe<M>(VecDeque<(u64, M)>);

impl<M> Pipe<M> {
    fn send(&mut self, now: u64, delay: u64, m: M) {
        // Never ahead of what was sent before it.
        let at = (now + delay).max(self.0.back().map_or(0, |b| b.0));
        self.0.push_back((at, m));
    }

    fn recv(&mut self, now: u64) -> Option<M> {
        if self.0.front()?.0 <= now {
            return self.0.pop_front().map(|(_, m)| m);
        }
        None
    }
}

/// One connection between a client (`Up`: what it sends) and a server (`Down`).
#[derive(Debug)]
pub struct Conn<Up, Down> {
    /// Its number (a server's answers to an earlier connection never arrive on it).
    pub id: u64,
    up: Pipe<Up>,
    down: Pipe<Down>,
}

impl<Up, Down> Conn<Up, Down> {
    pub fn new(id: u64) -> Self {
        Conn {
            id,
            up: Pipe(VecDeque::new()),
            down: Pipe(VecDeque::new()),
        }
    }

    /// The client sends `m`, arriving `delay` steps from `now` at the earliest.
    pub fn send_up(&mut self, now: u64, delay: u64, m: Up) {
        self.up.send(now, delay, m);
    }

    /// The server sends `m`.
    pub fn send_down(&mut self, now: u64, delay: u64, m: Down) {
        self.down.send(now, delay, m);
    }

    /// What has arrived at the server by `now`, one at a time.
    pub fn recv_up(&mut self, now: u64) -> Option<Up> {
        self.up.recv(now)
    }

    /// A message the server read but could not take yet (a full cache holds the agent
    /// back): it is the next one read again.
    pub fn unread_up(&mut self, now: u64, m: Up) {
        self.up.0.push_front((now, m));
    }

    /// What has arrived at the client by `now`.
    pub fn recv_down(&mut self, now: u64) -> Option<Down> {
        self.down.recv(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_and_never_early() {
        let mut c: Conn<u32, ()> = Conn::new(1);
        c.send_up(0, 5, 1);
        c.send_up(1, 0, 2);
        assert_eq!(c.recv_up(4), None);
        assert_eq!(
            (c.recv_up(5), c.recv_up(5), c.recv_up(5)),
            (Some(1), Some(2), None)
        );
    }
}
