//! A TCP relay that adds one-way delay: this kernel has no netem, so a WAN link's latency
//! comes from user space (its rate from `tbf` on a veth pair, see `benches/wan.rs`).
//!
//! # Design constraints
//! - Each direction of each connection is a reader thread and a writer thread joined by a
//!   bounded queue of chunks stamped with their arrival: the writer sends a chunk no sooner
//!   than `delay` after it arrived, so the delay holds whatever the rate, and bytes keep
//!   their order.
//! - Bounded: at most [`QUEUE_CHUNKS`] chunks of [`CHUNK_BYTES`] wait per direction (a full
//!   queue stops the reader, and TCP's flow control the sender); every thread ends when its
//!   connection does or the relay is dropped.
//! - A tap ([`DelayRelay::tap_start`]) records when each chunk from the client arrived and
//!   its size, to measure how a sender paces itself; at most [`TAP_MAX_CHUNKS`] are kept.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::{Error, Result};

/// The most one read takes off a connection.
const CHUNK_BYTES: usize = 64 << 10;
/// Chunks waiting per direction: 16 MiB, above a 1 Gbit/s link's bandwidth-delay product at
/// 100 ms.
const QUEUE_CHUNKS: usize = 256;

/// Chunks a tap keeps (about 24 MiB): 10 s of a 1 Gbit/s link in 2 KiB reads.
pub const TAP_MAX_CHUNKS: usize = 1 << 20;

/// Arrival time and size of each chunk from the client, while tapped.
type Tap = Arc<Mutex<Option<Vec<(Instant, usize)>>>>;

/// A delaying relay to one target; stops accepting when dropped.
#[derive(Debug)]
pub struct DelayRelay {
    /// Where to connect instead of the target.
    pub addr: String,
    stop: Arc<AtomicBool>,
    held: Arc<AtomicBool>,
    tap: Tap,
}

impl DelayRelay {
    /// Listens on `listen` (e.g. 127.0.0.1:0) and relays every connection to `target`,
    /// holding each byte `one_way` in each direction.
    pub fn start(listen: &str, target: &str, one_way: Duration) -> Result<DelayRelay> {
        let l = TcpListener::bind(listen).map_err(|source| Error::Io {
            context: format!("relay: bind {listen}"),
            source,
        })?;
        l.set_nonblocking(true).map_err(|source| Error::Io {
            context: "relay: nonblocking".into(),
            source,
        })?;
        let addr = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let stop = Arc::new(AtomicBool::new(false));
        let held = Arc::new(AtomicBool::new(false));
        let tap: Tap = Arc::default();
        let (s, h, target) = (Arc::clone(&stop), Arc::clone(&held), target.to_owned());
        let t = Arc::clone(&tap);
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    // Held: the link is down; a connection is closed at once.
                    Ok(_) if h.load(Ordering::Relaxed) => {}
                    Ok((down, _)) => {
                        if let Ok(up) = TcpStream::connect(&target) {
                            let _ = connect_pair(down, up, one_way, [&s, &h], &t);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(DelayRelay {
            addr,
            stop,
            held,
            tap,
        })
    }

    /// Starts recording each chunk that arrives from a client: when, and how many bytes.
    pub fn tap_start(&self) {
        *self.tap.lock().expect("not poisoned") = Some(Vec::new());
    }

    /// Stops recording; returns what was recorded, in arrival order.
    pub fn tap_take(&self) -> Vec<(Instant, usize)> {
        self.tap
            .lock()
            .expect("not poisoned")
            .take()
            .unwrap_or_default()
    }

    /// Takes the link down: connections through it close (within half a second), new ones
    /// are closed at once, until [`DelayRelay::release`].
    pub fn hold(&self) {
        self.held.store(true, Ordering::Relaxed);
    }

    /// Brings the link back.
    pub fn release(&self) {
        self.held.store(false, Ordering::Relaxed);
    }
}

impl Drop for DelayRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Starts both directions between `a` and `b`.
fn connect_pair(
    a: TcpStream,
    b: TcpStream,
    one_way: Duration,
    [stop, held]: [&Arc<AtomicBool>; 2],
    tap: &Tap,
) -> std::io::Result<()> {
    a.set_nonblocking(false)?;
    for s in [&a, &b] {
        s.set_nodelay(true)?;
    }
    // Only the client's side is tapped.
    for (from, to, tap) in [(a.try_clone()?, b.try_clone()?, Some(tap)), (b, a, None)] {
        let (tx, rx) = sync_channel(QUEUE_CHUNKS);
        let (stop, held, tap) = (Arc::clone(stop), Arc::clone(held), tap.cloned());
        std::thread::spawn(move || read_side(from, (&tx, tap), [&stop, &held]));
        std::thread::spawn(move || write_side(to, &rx, one_way));
    }
    Ok(())
}

fn read_side(
    mut from: TcpStream,
    (tx, tap): (&SyncSender<(Instant, Vec<u8>)>, Option<Tap>),
    flags: [&AtomicBool; 2],
) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = vec![0u8; CHUNK_BYTES];
    while !flags.iter().any(|f| f.load(Ordering::Relaxed)) {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let now = Instant::now();
                if let Some(t) = &tap {
                    if let Some(v) = t.lock().expect("not poisoned").as_mut() {
                        if v.len() < TAP_MAX_CHUNKS {
                            v.push((now, n));
                        }
                    }
                }
                if tx.send((now, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    // The queue's end tells the writer to close its side once the rest is delivered; a
    // held link closes this side at once, as a link that went down.
    if flags[1].load(Ordering::Relaxed) {
        let _ = from.shutdown(Shutdown::Both);
    }
}

fn write_side(mut to: TcpStream, rx: &Receiver<(Instant, Vec<u8>)>, one_way: Duration) {
    while let Ok((at, chunk)) = rx.recv() {
        if let Some(wait) = (at + one_way).checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        if to.write_all(&chunk).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
