//! The agent in the simulation: the real resend window (`agent::stream::Window`) over the
//! simulated connection to the process server, fed by the source's stream.

use agent::stream::Window;
use wire_protocol::Message;

use crate::model::{span, Source};
use crate::net::Conn;

/// What the agent sends the process server.
#[derive(Debug)]
pub enum ToPs {
    /// Attach the disk (the connection's first message).
    Attach,
    /// A batch or a bookmark of the stream.
    Data(Message),
}

/// What the process server answers.
#[derive(Debug)]
pub enum ToAgent {
    /// The attach's answer: the highest LSN the cache holds durably.
    Resume(u64),
    /// The cache does not know where the stream stands yet: the connection closes.
    NotReady,
    /// Durable in the cache up to this LSN.
    Ack(u64),
    /// Send again from this LSN.
    Nack(u64),
    /// An append or a sync failed: nothing acknowledged.
    Error,
    /// The process server closed the connection (after a failed append or sync): the
    /// last message on it.
    Closed,
}

pub type AgentConn = Conn<ToPs, ToAgent>;

/// The source-side machine.
pub struct Agent {
    pub window: Window,
    /// The next LSN of the source not yet in the window.
    pub next: u64,
    pub conn: Option<AgentConn>,
    /// The connection's attach was answered.
    attached: bool,
}

impl Agent {
    pub fn new(rng: &mut fastrand::Rng) -> Agent {
        Agent {
            // From a few writes to the whole stream.
            window: Window::new(rng.usize(8 << 10..512 << 10)),
            next: 1,
            conn: None,
            attached: false,
        }
    }

    /// Whether the agent would (re)connect: the real one does while anything waits for an
    /// ack or there is more to capture (`Link::poll`, `Link::send`).
    pub fn wants_link(&self, src: &Source) -> bool {
        !self.window.is_empty() || self.next <= src.last_lsn()
    }

    /// The connection is gone (a reset, or the process server died).
    pub fn drop_conn(&mut self) {
        self.conn = None;
        self.attached = false;
    }

    /// Opens a connection numbered `id` and asks to attach.
    pub fn connect(&mut self, id: u64, now: u64, delay: u64) {
        let mut c = Conn::new(id);
        c.send_up(now, delay, ToPs::Attach);
        self.conn = Some(c);
        self.attached = false;
    }

    /// Hears what arrived by `now`; sends what the answers ask for again.
    pub fn hear(&mut self, now: u64, rng: &mut fastrand::Rng) -> Result<(), String> {
        loop {
            let Some(c) = self.conn.as_mut() else {
                return Ok(());
            };
            let Some(m) = c.recv_down(now) else {
                return Ok(());
            };
            let resend = match m {
                ToAgent::Resume(l) => {
                    if l >= self.next {
                        return Err(format!(
                            "the process server resumes at lsn {l}, past what the agent sent ({})",
                            self.next - 1
                        ));
                    }
                    let r = self.window.resume(l);
                    if r.lost {
                        return Err(format!(
                            "the process server resumes at lsn {l}, before what the agent still holds: acknowledged writes lost"
                        ));
                    }
                    self.attached = true;
                    r.resend
                }
                ToAgent::NotReady | ToAgent::Closed => {
                    self.drop_conn();
                    return Ok(());
                }
                ToAgent::Ack(l) => {
                    self.window.on_ack(l);
                    Vec::new()
                }
                ToAgent::Nack(from) => self.window.from(from),
                ToAgent::Error => Vec::new(),
            };
            let c = self.conn.as_mut().expect("checked");
            for m in resend {
                c.send_up(now, rng.u64(..=3), ToPs::Data(m));
            }
        }
    }

    /// Captures up to `n` messages of the stream into the window (while it has room) and
    /// sends them if attached.
    pub fn capture(&mut self, src: &Source, n: usize, now: u64, rng: &mut fastrand::Rng) {
        for _ in 0..n {
            let Some(msg) = src.message(self.next, rng.usize(1..=8)) else {
                return;
            };
            let (first, last, _) = span(&msg);
            let bytes = match &msg {
                Message::WriteBatch(b) => b.writes.iter().map(|w| w.data.len()).sum(),
                _ => 0,
            };
            if !self.window.has_room(bytes) {
                return;
            }
            self.window.push(msg.clone(), first, last, bytes);
            self.next = last + 1;
            if let (true, Some(c)) = (self.attached, self.conn.as_mut()) {
                c.send_up(now, rng.u64(..=3), ToPs::Data(msg));
            }
        }
    }
}
