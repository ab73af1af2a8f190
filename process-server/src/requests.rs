//! The requests a link to the master target has in flight, and which one each answer
//! belongs to. Pure: no I/O, no clock; the uplink's shell sends what it says.
//!
//! # Design constraints
//! - An answer goes to the request it answers, never to another request of the same disk:
//!   from protocol version 2 every request carries an id unique on its link and every
//!   answer (digest list, error) carries it back; an error with id 0 answers nothing.
//! - A version-1 master target sends no ids: its answers are matched as before, by disk and
//!   order (attach first, then the oldest digest request of the disk).
//! - One attach of a disk is in flight at a time (a successful attach is answered by an
//!   `Ack` of the disk, which carries no id).

use std::collections::{HashMap, VecDeque};

use wire_protocol::version::REQUEST_IDS_SINCE;
use wire_protocol::{DigestList, DigestRequest, DiskAttach, ErrorMsg};

/// Requests in flight on one link. `A` answers an attach, `D` a digest request (the shell
/// uses oneshot senders; tests use anything).
#[derive(Debug)]
pub struct Requests<A, D> {
    version: u16,
    next_id: u64,
    attach: HashMap<u64, (u64, A)>,
    digests: HashMap<u64, VecDeque<(u64, D)>>,
    /// Attaches the link itself makes again (of disks the master target refused before).
    reattach: HashMap<u64, u64>,
}

/// Who an answer about a disk's attach goes to.
#[derive(Debug, PartialEq, Eq)]
pub enum AttachAnswer<A> {
    /// A relayed attach: answer its requester.
    Relayed(A),
    /// The link's own re-attach of a disk it refused before.
    Reattach,
}

/// Who an error goes to.
#[derive(Debug, PartialEq, Eq)]
pub enum ErrorFor<A, D> {
    /// The answer to an attach.
    Attach(AttachAnswer<A>),
    /// The answer to a digest request.
    Digests(D),
    /// No request: news about the disk (detached, say), or an answer to a request this link
    /// no longer waits for.
    Unsolicited,
}

impl<A, D> Requests<A, D> {
    /// Nothing in flight, on a link that speaks `version`.
    pub fn new(version: u16) -> Self {
        Requests {
            version,
            next_id: 0,
            attach: HashMap::new(),
            digests: HashMap::new(),
            reattach: HashMap::new(),
        }
    }

    fn ids(&self) -> bool {
        self.version >= REQUEST_IDS_SINCE
    }

    fn take_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Whether an attach of `disk_id` is in flight (relayed or the link's own).
    pub fn attaching(&self, disk_id: u64) -> bool {
        self.attach.contains_key(&disk_id) || self.reattach.contains_key(&disk_id)
    }

    /// Numbers a relayed attach and records who waits for it; gives `waiter` back when an
    /// attach of that disk is already in flight (the caller answers "busy").
    pub fn start_attach(&mut self, a: &mut DiskAttach, waiter: A) -> Result<(), A> {
        if self.attaching(a.disk_id) {
            return Err(waiter);
        }
        a.request_id = self.take_id();
        self.attach.insert(a.disk_id, (a.request_id, waiter));
        Ok(())
    }

    /// Numbers the link's own re-attach of a disk; false when one is in flight already.
    pub fn start_reattach(&mut self, a: &mut DiskAttach) -> bool {
        if self.attaching(a.disk_id) {
            return false;
        }
        a.request_id = self.take_id();
        self.reattach.insert(a.disk_id, a.request_id);
        true
    }

    /// Numbers a digest request and records who waits for it.
    pub fn start_digests(&mut self, r: &mut DigestRequest, waiter: D) {
        r.request_id = self.take_id();
        self.digests
            .entry(r.disk_id)
            .or_default()
            .push_back((r.request_id, waiter));
    }

    /// Forgets the requests nobody waits for any more (`waiting` says of each waiter).
    pub fn retain_waiting(&mut self, attach: impl Fn(&A) -> bool, digests: impl Fn(&D) -> bool) {
        self.attach.retain(|_, (_, a)| attach(a));
        for queue in self.digests.values_mut() {
            queue.retain(|(_, d)| digests(d));
        }
        self.digests.retain(|_, q| !q.is_empty());
    }

    /// An `Ack` entry of `disk_id`: the answer to its attach, if one is in flight (`None`:
    /// a durability ack of the stream).
    pub fn on_ack(&mut self, disk_id: u64) -> Option<AttachAnswer<A>> {
        if self.reattach.remove(&disk_id).is_some() {
            return Some(AttachAnswer::Reattach);
        }
        self.attach
            .remove(&disk_id)
            .map(|(_, a)| AttachAnswer::Relayed(a))
    }

    /// Who waits for this digest list (`None`: nobody; it is dropped).
    pub fn on_digests(&mut self, l: &DigestList) -> Option<D> {
        let ids = self.ids();
        let queue = self.digests.get_mut(&l.disk_id)?;
        let at = if ids {
            queue.iter().position(|(id, _)| *id == l.request_id)?
        } else {
            0
        };
        let (_, d) = queue.remove(at)?;
        if queue.is_empty() {
            self.digests.remove(&l.disk_id);
        }
        Some(d)
    }

    /// Who this error goes to.
    pub fn on_error(&mut self, e: &ErrorMsg) -> ErrorFor<A, D> {
        if self.ids() {
            self.by_id(e.disk_id, e.request_id)
        } else {
            self.by_disk(e.disk_id)
        }
    }

    fn by_id(&mut self, disk_id: u64, id: u64) -> ErrorFor<A, D> {
        if id == 0 {
            return ErrorFor::Unsolicited;
        }
        if self.reattach.get(&disk_id) == Some(&id) {
            self.reattach.remove(&disk_id);
            return ErrorFor::Attach(AttachAnswer::Reattach);
        }
        if self.attach.get(&disk_id).is_some_and(|(i, _)| *i == id) {
            let (_, a) = self.attach.remove(&disk_id).expect("checked");
            return ErrorFor::Attach(AttachAnswer::Relayed(a));
        }
        if let Some(queue) = self.digests.get_mut(&disk_id) {
            if let Some(at) = queue.iter().position(|(i, _)| *i == id) {
                let (_, d) = queue.remove(at).expect("found");
                if queue.is_empty() {
                    self.digests.remove(&disk_id);
                }
                return ErrorFor::Digests(d);
            }
        }
        ErrorFor::Unsolicited
    }

    /// Version 1: the attach of the disk if one waits, else its oldest digest request.
    fn by_disk(&mut self, disk_id: u64) -> ErrorFor<A, D> {
        if self.reattach.remove(&disk_id).is_some() {
            return ErrorFor::Attach(AttachAnswer::Reattach);
        }
        if let Some((_, a)) = self.attach.remove(&disk_id) {
            return ErrorFor::Attach(AttachAnswer::Relayed(a));
        }
        match self.digests.get_mut(&disk_id).and_then(VecDeque::pop_front) {
            Some((_, d)) => ErrorFor::Digests(d),
            None => ErrorFor::Unsolicited,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire_protocol::{ErrorCode, LocationKind};

    fn attach(disk_id: u64) -> DiskAttach {
        DiskAttach {
            disk_id,
            vm_id: "vm".into(),
            group_id: String::new(),
            disk_uuid: [0; 16],
            size_bytes: 1 << 20,
            sector_size: 512,
            location: LocationKind::Alternate,
            target: "t".into(),
            request_id: 0,
            os_type: String::new(),
        }
    }

    fn digests(disk_id: u64) -> DigestRequest {
        DigestRequest {
            disk_id,
            block_size: 4096,
            first_block: 0,
            block_count: 1,
            request_id: 0,
        }
    }

    fn error(disk_id: u64, request_id: u64) -> ErrorMsg {
        ErrorMsg {
            code: ErrorCode::Internal,
            disk_id,
            message: "x".into(),
            request_id,
        }
    }

    /// The bug this module fixes: an error about something else of the disk (a refused
    /// batch, a detach notice) went to whichever request of that disk waited.
    #[test]
    fn an_error_goes_to_the_request_it_answers_and_no_other() {
        let mut r: Requests<&str, &str> = Requests::new(2);
        let mut a = attach(7);
        r.start_attach(&mut a, "attach").unwrap();
        let (mut d1, mut d2) = (digests(7), digests(7));
        r.start_digests(&mut d1, "first digests");
        r.start_digests(&mut d2, "second digests");
        assert!(a.request_id != 0 && d1.request_id != d2.request_id);
        // Unsolicited news of the disk: nobody's answer.
        assert_eq!(r.on_error(&error(7, 0)), ErrorFor::Unsolicited);
        // An id of another disk's request, or of none: nobody's.
        assert_eq!(r.on_error(&error(8, d1.request_id)), ErrorFor::Unsolicited);
        assert_eq!(r.on_error(&error(7, 999)), ErrorFor::Unsolicited);
        // The second digest request fails: its waiter hears, not the attach nor the first.
        assert_eq!(
            r.on_error(&error(7, d2.request_id)),
            ErrorFor::Digests("second digests")
        );
        let list = DigestList {
            disk_id: 7,
            block_size: 4096,
            first_block: 0,
            digests: vec![],
            request_id: d1.request_id,
        };
        assert_eq!(r.on_digests(&list), Some("first digests"));
        assert_eq!(r.on_digests(&list), None, "answered once");
        assert_eq!(
            r.on_error(&error(7, a.request_id)),
            ErrorFor::Attach(AttachAnswer::Relayed("attach"))
        );
    }

    #[test]
    fn one_attach_of_a_disk_at_a_time() {
        let mut r: Requests<u8, u8> = Requests::new(2);
        r.start_attach(&mut attach(1), 1).unwrap();
        assert_eq!(r.start_attach(&mut attach(1), 2), Err(2));
        assert!(!r.start_reattach(&mut attach(1)));
        assert_eq!(r.on_ack(1), Some(AttachAnswer::Relayed(1)));
        assert_eq!(r.on_ack(1), None, "a later ack is the stream's");
        assert!(r.start_reattach(&mut attach(1)));
        assert_eq!(r.on_ack(1), Some(AttachAnswer::Reattach));
    }

    /// Requesters that gave up (the relay's time limit) are forgotten, so the map stays
    /// bounded by those still waiting, and a later attach of the disk is not "busy".
    #[test]
    fn waiters_that_gave_up_are_forgotten() {
        let mut r: Requests<bool, bool> = Requests::new(2);
        r.start_attach(&mut attach(1), false).unwrap();
        let (mut d1, mut d2) = (digests(1), digests(1));
        r.start_digests(&mut d1, false);
        r.start_digests(&mut d2, true);
        r.retain_waiting(|a| *a, |d| *d);
        assert!(!r.attaching(1));
        assert!(r.start_attach(&mut attach(1), true).is_ok());
        assert_eq!(r.on_error(&error(1, d1.request_id)), ErrorFor::Unsolicited);
        assert_eq!(
            r.on_error(&error(1, d2.request_id)),
            ErrorFor::Digests(true)
        );
    }

    /// A version-1 master target sends no ids: answers match by disk and order, as before.
    #[test]
    fn version_1_matches_by_disk_and_order() {
        let mut r: Requests<&str, &str> = Requests::new(1);
        let (mut d1, mut d2) = (digests(3), digests(3));
        r.start_digests(&mut d1, "first");
        r.start_digests(&mut d2, "second");
        assert_eq!(r.on_error(&error(3, 0)), ErrorFor::Digests("first"));
        let list = DigestList {
            disk_id: 3,
            block_size: 4096,
            first_block: 0,
            digests: vec![],
            request_id: 0,
        };
        assert_eq!(r.on_digests(&list), Some("second"));
        assert_eq!(r.on_error(&error(3, 0)), ErrorFor::Unsolicited);
    }
}
