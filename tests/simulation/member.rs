//! A group member in the simulation: one VM's disk, its application's writes captured into
//! the agent's real resend window (`agent::stream::Window`), and the agent's real cut rules
//! (`agent::hold`) answering the process server's cut messages.

use agent::hold::{self, Holding, Idle, HOLD_MAX_MS};
use agent::stream::Window;
use bytes::Bytes;
use wire_protocol::{Bookmark, BookmarkKind, Cut, Message, Write, WriteBatch};

use crate::net::Conn;

/// Simulated milliseconds per step (the agent's hold limit and the process server's phase
/// timeout are counted in steps of this).
pub const STEP_MS: u64 = 10;
/// Bytes of each member's disk.
pub const DISK_BYTES: usize = 64 << 10;

/// What a member sends the process server.
#[derive(Debug)]
pub enum Up {
    /// Attach the disk (the connection's first message).
    Attach,
    /// A batch or a bookmark of the stream.
    Data(Message),
    /// An answer to a cut message.
    Cut(Cut),
}

/// What the process server sends a member.
#[derive(Debug)]
pub enum Down {
    /// The attach's answer: the master target holds the disk up to this LSN.
    Resume(u64),
    /// No way on to the master target now: the connection closes.
    NotReady,
    /// Durable on the master target up to this LSN.
    Ack(u64),
    /// Send again from this LSN.
    Nack(u64),
    /// A cut message.
    Cut(Cut),
}

/// One item of a member's stream (its LSN is its index + 1).
#[derive(Debug, Clone)]
pub enum Item {
    Write {
        offset: u64,
        data: Bytes,
    },
    Marker {
        cut_id: u64,
    },
    /// A marker a hostile agent put in its stream unasked.
    Forged {
        cut_id: u64,
    },
}

/// One VM of the group: its stream, its agent's window, connection and hold.
pub struct Member {
    pub disk_id: u64,
    /// Everything captured, in LSN order: the source.
    pub items: Vec<Item>,
    pub window: Window,
    pub conn: Option<Conn<Up, Down>>,
    attached: bool,
    /// The cut being held, and the step the hold began.
    hold: Option<(Cut, u64)>,
    /// A broken agent for the checker's own test: it places its marker when told to hold,
    /// without waiting for the other members (`(cut, marker LSN)`).
    pub marks_on_hold: bool,
    early_marker: Option<(u64, u64)>,
    /// A hostile agent: it puts markers of its own choosing in its stream now and then.
    pub forges: bool,
    /// The image at an LSN, to move forward from.
    cached: (u64, Vec<u8>),
    /// How many cut messages it answered, and how many holds ended by its own limit.
    pub answered: u64,
    pub hold_timeouts: u64,
}

impl Member {
    pub fn new(disk_id: u64, rng: &mut fastrand::Rng) -> Member {
        Member {
            disk_id,
            items: Vec::new(),
            window: Window::new(rng.usize(16 << 10..256 << 10)),
            conn: None,
            attached: false,
            hold: None,
            marks_on_hold: false,
            early_marker: None,
            forges: false,
            cached: (0, vec![0; DISK_BYTES]),
            answered: 0,
            hold_timeouts: 0,
        }
    }

    /// The last LSN captured.
    pub fn last_lsn(&self) -> u64 {
        self.items.len() as u64
    }

    /// Whether the agent holds new writes for a cut.
    pub fn holding(&self) -> bool {
        self.hold.is_some()
    }

    /// The connection is gone.
    pub fn drop_conn(&mut self) {
        self.conn = None;
        self.attached = false;
    }

    /// Opens connection `id` and asks to attach.
    pub fn connect(&mut self, id: u64, now: u64, delay: u64) {
        let mut c = Conn::new(id);
        c.send_up(now, delay, Up::Attach);
        self.conn = Some(c);
        self.attached = false;
    }

    fn send(&mut self, now: u64, rng: &mut fastrand::Rng, m: Up) {
        let delay = crate::group::delay(rng);
        if let Some(c) = self.conn.as_mut() {
            c.send_up(now, delay, m);
        }
    }

    /// Captures an application write; `false` if it must wait (the agent holds for a cut,
    /// or its window is full): the application's write has not completed.
    pub fn write(
        &mut self,
        offset: u64,
        data: Vec<u8>,
        time_us: u64,
        now: u64,
        rng: &mut fastrand::Rng,
    ) -> bool {
        if self.holding() || !self.window.has_room(data.len()) {
            return false;
        }
        let data = Bytes::from(data);
        let lsn = self.last_lsn() + 1;
        let msg = Message::WriteBatch(WriteBatch {
            disk_id: self.disk_id,
            first_lsn: lsn,
            writes: vec![Write {
                timestamp_us: time_us,
                offset,
                digest: wire_protocol::digest(&data),
                data: data.clone(),
            }],
        });
        self.items.push(Item::Write {
            offset,
            data: data.clone(),
        });
        self.push(msg, lsn, data.len(), now, rng);
        true
    }

    fn push(&mut self, msg: Message, lsn: u64, bytes: usize, now: u64, rng: &mut fastrand::Rng) {
        self.window.push(msg.clone(), lsn, lsn, bytes);
        if self.attached {
            self.send(now, rng, Up::Data(msg));
        }
    }

    /// Puts a cut's marker in the stream; returns its LSN.
    fn place_marker(
        &mut self,
        m: &hold::Marker,
        time_us: u64,
        now: u64,
        rng: &mut fastrand::Rng,
    ) -> u64 {
        let lsn = self.last_lsn() + 1;
        let msg = Message::Bookmark(Bookmark {
            disk_id: self.disk_id,
            lsn,
            kind: m.kind,
            time_us,
            group_marker: m.cut_id,
            group_members: m.members,
            tag: m.tag.clone(),
        });
        self.items.push(Item::Marker { cut_id: m.cut_id });
        self.push(msg, lsn, 0, now, rng);
        lsn
    }

    /// A hostile agent's marker for cut `cut_id` claiming `members` disks, asked for by no
    /// one (to make a group point of its own, or to hide one).
    pub fn forge(
        &mut self,
        cut_id: u64,
        members: u32,
        time_us: u64,
        now: u64,
        rng: &mut fastrand::Rng,
    ) {
        let lsn = self.last_lsn() + 1;
        let msg = Message::Bookmark(Bookmark {
            disk_id: self.disk_id,
            lsn,
            // Dressed as the real marker of an interval cut: only its place (and maybe its
            // count) gives it away.
            kind: BookmarkKind::CrashConsistent,
            // Its own clock: one far ahead is refused by the process server
            // (`ingest::MAX_CLOCK_LEAD_US`), found by this simulation.
            time_us,
            group_marker: cut_id,
            group_members: members,
            tag: format!("group-cut-{cut_id}"),
        });
        self.items.push(Item::Forged { cut_id });
        self.push(msg, lsn, 0, now, rng);
    }

    /// Hears what arrived by `now` and answers it; `Err` for an answer that breaks a rule.
    pub fn hear(&mut self, now: u64, time_us: u64, rng: &mut fastrand::Rng) -> Result<(), String> {
        loop {
            let Some(m) = self.conn.as_mut().and_then(|c| c.recv_down(now)) else {
                return Ok(());
            };
            let resend = match m {
                Down::Resume(l) => {
                    if l > self.last_lsn() {
                        return Err(format!(
                            "disk {}: the master target holds lsn {l}, past what the agent captured ({})",
                            self.disk_id,
                            self.last_lsn()
                        ));
                    }
                    let r = self.window.resume(l);
                    if r.lost {
                        return Err(format!(
                            "disk {}: the master target resumes at lsn {l}, before what the agent still holds: acknowledged writes lost",
                            self.disk_id
                        ));
                    }
                    self.attached = true;
                    r.resend
                }
                Down::NotReady => {
                    self.drop_conn();
                    return Ok(());
                }
                Down::Ack(l) => {
                    self.window.on_ack(l);
                    Vec::new()
                }
                Down::Nack(from) => self.window.from(from),
                Down::Cut(c) => {
                    self.answered += 1;
                    self.on_cut(&c, now, time_us, rng);
                    Vec::new()
                }
            };
            for m in resend {
                self.send(now, rng, Up::Data(m));
            }
        }
    }

    /// The agent's rules for a cut message (`agent::hold`, as `engine/cut.rs` applies them).
    fn on_cut(&mut self, c: &Cut, now: u64, time_us: u64, rng: &mut fastrand::Rng) {
        let answer = if let Some((h, started)) = self.hold.clone() {
            let held_ms = (now - started) * STEP_MS;
            match hold::on_holding(&h, c, held_ms) {
                Holding::Mark(m) => {
                    let lsn = self.place_marker(&m, time_us, now, rng);
                    self.hold = None;
                    hold::marked(&h, c.flags, lsn, held_ms * 1_000)
                }
                Holding::RefuseMark(a) => {
                    self.hold = None;
                    a
                }
                Holding::Release => {
                    self.hold = None;
                    hold::released(&h, held_ms * 1_000)
                }
                Holding::RefuseOther(a) => a,
                Holding::Wait => return,
            }
        } else if let Some((_, lsn)) = self.early_marker.filter(|e| e.0 == c.cut_id) {
            // The broken agent: its marker is already in the stream.
            self.early_marker = None;
            hold::marked(c, c.flags, lsn, 0)
        } else {
            match hold::on_idle(c) {
                Idle::Begin if !self.attached => {
                    hold::refused(c, "the link to the process server is down")
                }
                Idle::Begin if self.marks_on_hold => {
                    let m = hold::Marker {
                        kind: BookmarkKind::CrashConsistent,
                        tag: format!("group-cut-{}", c.cut_id),
                        cut_id: c.cut_id,
                        members: 2,
                    };
                    let lsn = self.place_marker(&m, time_us, now, rng);
                    self.early_marker = Some((c.cut_id, lsn));
                    hold::held(c, lsn - 1)
                }
                Idle::Begin => {
                    self.hold = Some((c.clone(), now));
                    hold::held(c, self.last_lsn())
                }
                Idle::Refuse(a) => a,
                Idle::Ignore => return,
            }
        };
        self.send(now, rng, Up::Cut(answer));
    }

    /// Ends a hold that reached the agent's limit (its timer in `engine/cut.rs`).
    pub fn tick(&mut self, now: u64, rng: &mut fastrand::Rng) {
        if let Some((h, started)) = self.hold.clone() {
            let held_ms = (now - started) * STEP_MS;
            if held_ms >= HOLD_MAX_MS {
                self.hold = None;
                self.hold_timeouts += 1;
                self.send(now, rng, Up::Cut(hold::released(&h, held_ms * 1_000)));
            }
        }
    }

    /// The agent restarted (SIGKILL): its hold is gone with it, and, as the real agent's
    /// journal does, it resends what was not acknowledged.
    pub fn restart(&mut self) {
        self.drop_conn();
        self.hold = None;
        self.early_marker = None;
    }

    /// The disk at `lsn`.
    pub fn image_at(&mut self, lsn: u64) -> Vec<u8> {
        if lsn < self.cached.0 {
            self.cached = (0, vec![0; DISK_BYTES]);
        }
        let (from, img) = &mut self.cached;
        for item in &self.items[*from as usize..lsn as usize] {
            if let Item::Write { offset, data } = item {
                img[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
            }
        }
        *from = lsn;
        img.clone()
    }
}
