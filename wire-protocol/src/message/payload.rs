//! Encoding and decoding of payloads, as the layouts in the [module doc](super) say, one
//! function per message. The version in the frame header picks the layout: version 2 adds
//! trailing request ids, version 3 the attach's OS type, the bookmark's group size and the
//! cut, version 4 zero extents in write batches.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::types::*;
use super::{
    invalid, Ack, AckEntry, Bookmark, BookmarkKind, Cut, CutPhase, DigestList, DigestRequest,
    DiskAttach, ErrorCode, ErrorMsg, Hello, LocationKind, Message, Nack, Role, Write, WriteBatch,
    BATCH_HEADER_LEN, IGNORABLE_TYPES_START, MAX_ACK_ENTRIES, MAX_BATCH_DATA_LEN,
    MAX_DIGESTS_PER_LIST, MAX_WRITES_PER_BATCH, WRITE_META_LEN, ZERO_EXTENT,
};
use crate::version::{GROUPS_SINCE, REQUEST_IDS_SINCE, ZERO_EXTENTS_SINCE};
use crate::{Error, Result};

impl Message {
    /// Appends the payload encoding of this message, in protocol `version`, to `dst`.
    pub fn encode_payload(&self, version: u16, dst: &mut BytesMut) -> Result<()> {
        match self {
            Message::Hello(h) => {
                dst.put_u16(h.proto_min);
                dst.put_u16(h.proto_max);
                dst.put_u8(h.role as u8);
                dst.put_u32(h.capabilities);
                put_str(dst, &h.node_id)?;
            }
            Message::DiskAttach(a) => encode_attach(a, dst)?,
            Message::WriteBatch(b) => encode_batch(b, version >= ZERO_EXTENTS_SINCE, dst)?,
            Message::Bookmark(m) => {
                dst.put_u64(m.disk_id);
                dst.put_u64(m.lsn);
                dst.put_u8(m.kind as u8);
                dst.put_u64(m.time_us);
                dst.put_u64(m.group_marker);
                put_str(dst, &m.tag)?;
            }
            Message::Ack(a) => encode_ack(a, dst)?,
            Message::DigestRequest(r) => {
                dst.put_u64(r.disk_id);
                dst.put_u32(r.block_size);
                dst.put_u64(r.first_block);
                dst.put_u32(r.block_count);
            }
            Message::DigestList(l) => encode_digests(l, dst)?,
            Message::Heartbeat { seq, time_us } => {
                dst.put_u64(*seq);
                dst.put_u64(*time_us);
            }
            Message::Error(e) => {
                dst.put_u16(e.code as u16);
                dst.put_u64(e.disk_id);
                put_str(dst, &e.message)?;
            }
            Message::Nack(n) => {
                dst.put_u64(n.disk_id);
                dst.put_u64(n.from_lsn);
                dst.put_u16(n.code as u16);
                put_str(dst, &n.reason)?;
            }
            Message::Detach { disk_id } => dst.put_u64(*disk_id),
            Message::Cut(c) => {
                if version < GROUPS_SINCE {
                    return Err(Error::Invalid {
                        field: "message",
                        detail: format!("a cut needs protocol version {GROUPS_SINCE}, the peer speaks {version}"),
                    });
                }
                dst.put_u8(c.phase as u8);
                dst.put_u64(c.disk_id);
                dst.put_u64(c.cut_id);
                dst.put_u64(c.lsn);
                dst.put_u8(c.flags);
                dst.put_u64(c.hold_us);
                put_str(dst, &c.tag)?;
            }
            Message::RemoteDurable { disk_id, lsn } => {
                dst.put_u64(*disk_id);
                dst.put_u64(*lsn);
            }
            Message::Ignored { msg_type } => {
                return Err(Error::Invalid {
                    field: "message",
                    detail: format!("type {msg_type} is receive-only"),
                })
            }
        }
        if version >= REQUEST_IDS_SINCE && carries_request_id(self.msg_type()) {
            dst.put_u64(self.request_id());
        }
        match (self, version >= GROUPS_SINCE) {
            (Message::DiskAttach(a), true) => put_str(dst, &a.os_type)?,
            (Message::Bookmark(b), true) => dst.put_u32(b.group_members),
            _ => {}
        }
        Ok(())
    }

    /// Decodes a message of type `msg_type` from its (decompressed) payload, laid out as
    /// protocol `version` says. Write data are zero-copy slices of `payload`, or of a static
    /// array of zeros for a zero extent (version 4).
    pub fn decode_payload(version: u16, msg_type: u16, payload: Bytes) -> Result<Message> {
        let what = match msg_type {
            HELLO => "hello",
            DISK_ATTACH => "disk attach",
            WRITE_BATCH => "write batch",
            BOOKMARK => "bookmark",
            ACK => "ack",
            DIGEST_REQUEST => "digest request",
            DIGEST_LIST => "digest list",
            HEARTBEAT => "heartbeat",
            ERROR => "error",
            NACK => "nack",
            DETACH => "detach",
            CUT if version >= GROUPS_SINCE => "cut",
            REMOTE_DURABLE => "remote durable",
            t if t >= IGNORABLE_TYPES_START => return Ok(Message::Ignored { msg_type: t }),
            t => return Err(Error::UnknownMessage(t)),
        };
        let mut r = Reader { buf: payload, what };
        let mut msg = decode_fields(msg_type, version, &mut r)?;
        if version >= REQUEST_IDS_SINCE && carries_request_id(msg_type) {
            let id = r.u64()?;
            msg.set_request_id(id);
        }
        match (&mut msg, version >= GROUPS_SINCE) {
            (Message::DiskAttach(a), true) => a.os_type = r.string("os type")?,
            (Message::Bookmark(b), true) => b.group_members = r.u32()?,
            _ => {}
        }
        r.finish()?;
        Ok(msg)
    }
}

/// Whether a message type ends with a request id (from version 2).
fn carries_request_id(msg_type: u16) -> bool {
    matches!(msg_type, DISK_ATTACH | DIGEST_REQUEST | DIGEST_LIST | ERROR)
}

/// The fields every version has, of a known message type.
fn decode_fields(msg_type: u16, version: u16, r: &mut Reader) -> Result<Message> {
    Ok(match msg_type {
        HELLO => Message::Hello(Hello {
            proto_min: r.u16()?,
            proto_max: r.u16()?,
            role: match r.u8()? {
                1 => Role::Agent,
                2 => Role::ProcessServer,
                3 => Role::MasterTarget,
                4 => Role::Admin,
                v => return Err(invalid("role", v)),
            },
            capabilities: r.u32()?,
            node_id: r.string("node id")?,
        }),
        DISK_ATTACH => Message::DiskAttach(decode_attach(r)?),
        WRITE_BATCH => Message::WriteBatch(decode_batch(r, version >= ZERO_EXTENTS_SINCE)?),
        BOOKMARK => Message::Bookmark(decode_bookmark(r)?),
        ACK => {
            let n = r.count(MAX_ACK_ENTRIES, 16)?;
            let mut entries = Vec::with_capacity(n);
            for _ in 0..n {
                entries.push(AckEntry {
                    disk_id: r.u64()?,
                    durable_lsn: r.u64()?,
                });
            }
            Message::Ack(Ack { entries })
        }
        DIGEST_REQUEST => Message::DigestRequest(DigestRequest {
            disk_id: r.u64()?,
            block_size: r.u32()?,
            first_block: r.u64()?,
            block_count: r.u32()?,
            request_id: 0,
        }),
        DIGEST_LIST => Message::DigestList(decode_digests(r)?),
        HEARTBEAT => Message::Heartbeat {
            seq: r.u64()?,
            time_us: r.u64()?,
        },
        ERROR => Message::Error(ErrorMsg {
            code: ErrorCode::from_u16(r.u16()?)?,
            disk_id: r.u64()?,
            message: r.string("message")?,
            request_id: 0,
        }),
        NACK => Message::Nack(Nack {
            disk_id: r.u64()?,
            from_lsn: r.u64()?,
            code: ErrorCode::from_u16(r.u16()?)?,
            reason: r.string("reason")?,
        }),
        DETACH => Message::Detach { disk_id: r.u64()? },
        CUT => Message::Cut(Cut {
            phase: match r.u8()? {
                1 => CutPhase::Hold,
                2 => CutPhase::Held,
                3 => CutPhase::Mark,
                4 => CutPhase::Release,
                5 => CutPhase::Marked,
                6 => CutPhase::Refused,
                7 => CutPhase::Released,
                v => return Err(invalid("cut phase", v)),
            },
            disk_id: r.u64()?,
            cut_id: r.u64()?,
            lsn: r.u64()?,
            flags: r.u8()?,
            hold_us: r.u64()?,
            tag: r.string("tag")?,
        }),
        REMOTE_DURABLE => Message::RemoteDurable {
            disk_id: r.u64()?,
            lsn: r.u64()?,
        },
        _ => unreachable!("the caller names only known types"),
    })
}

fn encode_attach(a: &DiskAttach, dst: &mut BytesMut) -> Result<()> {
    dst.put_u64(a.disk_id);
    put_str(dst, &a.vm_id)?;
    put_str(dst, &a.group_id)?;
    dst.put_slice(&a.disk_uuid);
    dst.put_u64(a.size_bytes);
    dst.put_u32(a.sector_size);
    dst.put_u8(a.location as u8);
    put_str(dst, &a.target)
}

fn decode_attach(r: &mut Reader) -> Result<DiskAttach> {
    Ok(DiskAttach {
        disk_id: r.u64()?,
        vm_id: r.string("vm id")?,
        group_id: r.string("group id")?,
        disk_uuid: r.array()?,
        size_bytes: r.u64()?,
        sector_size: r.u32()?,
        location: match r.u8()? {
            0 => LocationKind::Original,
            1 => LocationKind::Alternate,
            v => return Err(invalid("location kind", v)),
        },
        target: r.string("target")?,
        request_id: 0,
        os_type: String::new(),
    })
}

fn decode_bookmark(r: &mut Reader) -> Result<Bookmark> {
    Ok(Bookmark {
        disk_id: r.u64()?,
        lsn: r.u64()?,
        kind: match r.u8()? {
            0 => BookmarkKind::CrashConsistent,
            1 => BookmarkKind::AppConsistent,
            2 => BookmarkKind::ResyncStarted,
            3 => BookmarkKind::ResyncCompleted,
            v => return Err(invalid("bookmark kind", v)),
        },
        time_us: r.u64()?,
        group_marker: r.u64()?,
        tag: r.string("tag")?,
        group_members: 0,
    })
}

fn encode_ack(a: &Ack, dst: &mut BytesMut) -> Result<()> {
    if a.entries.len() > MAX_ACK_ENTRIES {
        return Err(Error::TooLarge {
            what: "ack entries",
            len: a.entries.len() as u64,
            max: MAX_ACK_ENTRIES as u64,
        });
    }
    dst.put_u32(a.entries.len() as u32);
    for e in &a.entries {
        dst.put_u64(e.disk_id);
        dst.put_u64(e.durable_lsn);
    }
    Ok(())
}

fn encode_digests(l: &DigestList, dst: &mut BytesMut) -> Result<()> {
    if l.digests.len() > MAX_DIGESTS_PER_LIST {
        return Err(Error::TooLarge {
            what: "digest list",
            len: l.digests.len() as u64,
            max: MAX_DIGESTS_PER_LIST as u64,
        });
    }
    dst.put_u64(l.disk_id);
    dst.put_u32(l.block_size);
    dst.put_u64(l.first_block);
    dst.put_u32(l.digests.len() as u32);
    for d in &l.digests {
        dst.put_slice(d);
    }
    Ok(())
}

fn decode_digests(r: &mut Reader) -> Result<DigestList> {
    let disk_id = r.u64()?;
    let block_size = r.u32()?;
    let first_block = r.u64()?;
    let n = r.count(MAX_DIGESTS_PER_LIST, 32)?;
    let mut digests = Vec::with_capacity(n);
    for _ in 0..n {
        digests.push(r.array()?);
    }
    Ok(DigestList {
        disk_id,
        block_size,
        first_block,
        digests,
        request_id: 0,
    })
}

/// Encodes a batch; with `zero_extents` (version 4), a write of zeros as its length alone.
fn encode_batch(b: &WriteBatch, zero_extents: bool, dst: &mut BytesMut) -> Result<()> {
    if b.writes.is_empty() || b.writes.len() > MAX_WRITES_PER_BATCH {
        return Err(Error::Invalid {
            field: "write count",
            detail: format!("{} (must be 1..={MAX_WRITES_PER_BATCH})", b.writes.len()),
        });
    }
    let data_len = b.data_len();
    if data_len > MAX_BATCH_DATA_LEN {
        return Err(Error::TooLarge {
            what: "batch data",
            len: data_len as u64,
            max: MAX_BATCH_DATA_LEN as u64,
        });
    }
    dst.reserve(BATCH_HEADER_LEN + b.writes.len() * WRITE_META_LEN + data_len);
    dst.put_u64(b.disk_id);
    dst.put_u64(b.first_lsn);
    dst.put_u32(b.writes.len() as u32);
    for w in &b.writes {
        let zeros = zero_extents && crate::is_zeros(&w.data);
        dst.put_u64(w.timestamp_us);
        dst.put_u64(w.offset);
        dst.put_u32(w.data.len() as u32 | if zeros { ZERO_EXTENT } else { 0 });
        dst.put_slice(&w.digest);
        if !zeros {
            dst.put_slice(&w.data);
        }
    }
    Ok(())
}

/// The bytes of a zero extent: a decoded one's data is a slice of this (never written, so
/// its pages are the kernel's shared zero page, not memory of ours).
pub(crate) static ZEROS: [u8; MAX_BATCH_DATA_LEN] = [0; MAX_BATCH_DATA_LEN];

/// Decodes a batch; with `zero_extents` (version 4), a length with [`ZERO_EXTENT`] set is
/// a write of that many zeros, its data absent.
fn decode_batch(r: &mut Reader, zero_extents: bool) -> Result<WriteBatch> {
    let disk_id = r.u64()?;
    let first_lsn = r.u64()?;
    let n = r.count(MAX_WRITES_PER_BATCH, WRITE_META_LEN)?;
    if n == 0 {
        return Err(Error::Invalid {
            field: "write count",
            detail: "a batch has no writes".into(),
        });
    }
    if first_lsn == 0 || first_lsn.checked_add(n as u64).is_none() {
        return Err(invalid("first lsn", first_lsn));
    }
    let mut writes = Vec::with_capacity(n);
    let mut data_total = 0usize;
    for _ in 0..n {
        let timestamp_us = r.u64()?;
        let offset = r.u64()?;
        let raw_len = r.u32()?;
        // Before version 4 the bit is part of the length, which the batch limit refuses.
        let zeros = zero_extents && raw_len & ZERO_EXTENT != 0;
        let len = if zeros {
            raw_len & !ZERO_EXTENT
        } else {
            raw_len
        } as usize;
        let digest = r.array()?;
        data_total += len;
        if data_total > MAX_BATCH_DATA_LEN {
            return Err(Error::TooLarge {
                what: "batch data",
                len: data_total as u64,
                max: MAX_BATCH_DATA_LEN as u64,
            });
        }
        if offset.checked_add(len as u64).is_none() {
            return Err(invalid("write offset", offset));
        }
        let data = if zeros {
            // Within the batch limit (checked above), so within ZEROS.
            Bytes::from_static(&ZEROS[..len])
        } else {
            r.bytes(len)?
        };
        writes.push(Write {
            timestamp_us,
            offset,
            digest,
            data,
        });
    }
    Ok(WriteBatch {
        disk_id,
        first_lsn,
        writes,
    })
}
/// A reader over a payload that turns every shortfall into [`Error::Truncated`].
struct Reader {
    buf: Bytes,
    what: &'static str,
}

impl Reader {
    fn need(&self, n: usize) -> Result<()> {
        if self.buf.remaining() < n {
            return Err(Error::Truncated(self.what));
        }
        Ok(())
    }
    fn u8(&mut self) -> Result<u8> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }
    fn u16(&mut self) -> Result<u16> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }
    fn u32(&mut self) -> Result<u32> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }
    fn u64(&mut self) -> Result<u64> {
        self.need(8)?;
        Ok(self.buf.get_u64())
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        self.need(N)?;
        let mut a = [0u8; N];
        self.buf.copy_to_slice(&mut a);
        Ok(a)
    }
    fn bytes(&mut self, n: usize) -> Result<Bytes> {
        self.need(n)?;
        Ok(self.buf.split_to(n))
    }
    fn string(&mut self, field: &'static str) -> Result<String> {
        let n = self.u16()? as usize;
        let b = self.bytes(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| Error::Invalid {
            field,
            detail: "not UTF-8".into(),
        })
    }
    /// Checks a declared element count against a limit and against the bytes left, before
    /// anything is allocated for it.
    fn count(&mut self, max: usize, min_elem_len: usize) -> Result<usize> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(Error::TooLarge {
                what: "element count",
                len: n as u64,
                max: max as u64,
            });
        }
        self.need(n.saturating_mul(min_elem_len))?;
        Ok(n)
    }
    fn finish(self) -> Result<()> {
        if self.buf.has_remaining() {
            return Err(Error::TrailingBytes {
                message: self.what,
                extra: self.buf.remaining(),
            });
        }
        Ok(())
    }
}

fn put_str(dst: &mut BytesMut, s: &str) -> Result<()> {
    let n = u16::try_from(s.len()).map_err(|_| Error::TooLarge {
        what: "string",
        len: s.len() as u64,
        max: u16::MAX.into(),
    })?;
    dst.put_u16(n);
    dst.put_slice(s.as_bytes());
    Ok(())
}
