//! The source side of the simulation: the stream a VM writes and its disk at any LSN.

use bytes::Bytes;
use store::FileHandle;
use wire_protocol::{Bookmark, BookmarkKind, Message, Write, WriteBatch};

/// Bytes of the simulated disk.
pub const DISK_BYTES: usize = 128 << 10;
/// The disk's id.
pub const DISK_ID: u64 = 7;

/// One item of the stream (its LSN is its index + 1).
#[derive(Debug, Clone)]
pub enum Item {
    Write {
        offset: u64,
        data: Bytes,
        time_us: u64,
    },
    Bookmark {
        tag: String,
        time_us: u64,
    },
}

/// The source: the stream, and the disk image at any LSN.
pub struct Source {
    pub items: Vec<Item>,
    /// (lsn, image) of the last image asked for, to move forward from.
    cached: (u64, Vec<u8>),
}

impl Source {
    /// 150–500 items: writes of 512 B–8 KiB, an app-consistent bookmark now and then.
    pub fn generate(rng: &mut fastrand::Rng) -> Source {
        let mut items = Vec::new();
        let mut t = 1_000_000_000u64;
        for i in 0..rng.usize(150..500) {
            t += rng.u64(..200_000);
            if rng.u32(..12) == 0 {
                items.push(Item::Bookmark {
                    tag: format!("app-{i}"),
                    time_us: t,
                });
                continue;
            }
            let len = rng.usize(1..=16) * 512;
            let offset = rng.usize(..=(DISK_BYTES - len) / 512) * 512;
            let mut data = vec![rng.u8(..); len];
            data[0] = rng.u8(..);
            items.push(Item::Write {
                offset: offset as u64,
                data: Bytes::from(data),
                time_us: t,
            });
        }
        Source {
            items,
            cached: (0, vec![0; DISK_BYTES]),
        }
    }

    pub fn last_lsn(&self) -> u64 {
        self.items.len() as u64
    }

    pub fn image_at(&mut self, lsn: u64) -> Vec<u8> {
        if lsn < self.cached.0 {
            self.cached = (0, vec![0; DISK_BYTES]);
        }
        let (from, img) = &mut self.cached;
        for item in &self.items[*from as usize..lsn as usize] {
            if let Item::Write { offset, data, .. } = item {
                img[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
            }
        }
        *from = lsn;
        img.clone()
    }

    /// The message carrying the stream from `from` on: a bookmark alone, or a batch of up
    /// to `max_writes` consecutive writes. `None` past the end.
    pub fn message(&self, from: u64, max_writes: usize) -> Option<Message> {
        match self.items.get(from as usize - 1)? {
            Item::Bookmark { tag, time_us } => Some(Message::Bookmark(Bookmark {
                disk_id: DISK_ID,
                lsn: from,
                kind: BookmarkKind::AppConsistent,
                time_us: *time_us,
                group_marker: 0,
                group_members: 0,
                tag: tag.clone(),
            })),
            Item::Write { .. } => {
                let mut writes = Vec::new();
                let mut lsn = from;
                while writes.len() < max_writes {
                    let Some(Item::Write {
                        offset,
                        data,
                        time_us,
                    }) = self.items.get(lsn as usize - 1)
                    else {
                        break;
                    };
                    writes.push(Write {
                        timestamp_us: *time_us,
                        offset: *offset,
                        digest: wire_protocol::digest(data),
                        data: data.clone(),
                    });
                    lsn += 1;
                }
                Some(Message::WriteBatch(WriteBatch {
                    disk_id: DISK_ID,
                    first_lsn: from,
                    writes,
                }))
            }
        }
    }
}

/// The LSN span and first capture time of a stream message.
pub fn span(msg: &Message) -> (u64, u64, u64) {
    match msg {
        Message::WriteBatch(b) => (b.first_lsn, b.last_lsn(), b.writes[0].timestamp_us),
        Message::Bookmark(b) => (b.lsn, b.lsn, b.time_us),
        other => unreachable!("not a stream message: {other:?}"),
    }
}

/// An export target in memory.
#[derive(Debug)]
pub struct MemFile(pub std::sync::Mutex<Vec<u8>>);

impl FileHandle for MemFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let d = self.0.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_all_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        let mut d = self.0.lock().unwrap();
        d[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.0.lock().unwrap().len() as u64)
    }
    fn set_len(&self, _: u64) -> std::io::Result<()> {
        unreachable!("exports never resize")
    }
    fn sync_data(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn sync_all(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn drop_cache(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What runs did, summed over seeds for the report.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    pub steps: u64,
    pub sim_us: u64,
    pub crashes: u64,
    pub kills: u64,
    pub eio: u64,
    pub enospc: u64,
    pub torn: u64,
    pub lost_unsynced: u64,
    pub resets: u64,
    pub partitions: u64,
    pub acked_lsn: u64,
    pub points_checked: u64,
}

impl Tally {
    pub fn add(&mut self, t: &Tally) {
        self.steps += t.steps;
        self.sim_us += t.sim_us;
        self.crashes += t.crashes;
        self.kills += t.kills;
        self.eio += t.eio;
        self.enospc += t.enospc;
        self.torn += t.torn;
        self.lost_unsynced += t.lost_unsynced;
        self.resets += t.resets;
        self.partitions += t.partitions;
        self.acked_lsn += t.acked_lsn;
        self.points_checked += t.points_checked;
    }

    /// Adds what a simulated volume counted.
    pub fn add_fs(&mut self, st: store::SimStats) {
        self.crashes += st.crashes;
        self.eio += st.eio;
        self.enospc += st.enospc;
        self.torn += st.writes_torn;
        self.lost_unsynced += st.writes_lost;
    }
}
