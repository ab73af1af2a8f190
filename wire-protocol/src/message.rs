//! Messages and their payload layouts.
//!
//! Type numbers are fixed forever and never reused (DRBD's habit); numbers from
//! [`IGNORABLE_TYPES_START`] up are optional messages an older peer may skip. All integers are
//! big-endian. `str` is `{ len: u16, utf8: [u8; len] }`.
//!
//! ```text
//! Hello         = 1  { proto_min: u16, proto_max: u16, role: u8, capabilities: u32, node_id: str }
//! DiskAttach    = 2  { disk_id: u64, vm_id: str, group_id: str, disk_uuid: [u8; 16],
//!                      size_bytes: u64, sector_size: u32, location: u8, target: str }
//! WriteBatch    = 3  { disk_id: u64, first_lsn: u64, count: u32,
//!                      writes: [{ timestamp_us: u64, offset: u64, len: u32,
//!                                 digest: [u8; 32], data: [u8; len] }; count] }
//!                    // write i has LSN first_lsn + i; digest = blake3(data), made at capture
//! Bookmark      = 4  { disk_id: u64, lsn: u64, kind: u8, time_us: u64, group_marker: u64, tag: str }
//!                    // a bookmark takes an LSN of its own in the disk's stream
//! Ack           = 5  { count: u32, entries: [{ disk_id: u64, durable_lsn: u64 }; count] }
//! DigestRequest = 6  { disk_id: u64, block_size: u32, first_block: u64, block_count: u32 }
//! DigestList    = 7  { disk_id: u64, block_size: u32, first_block: u64, count: u32,
//!                      digests: [[u8; 32]; count] }
//! Heartbeat     = 8  { seq: u64, time_us: u64 }
//! Error         = 9  { code: u16, disk_id: u64, message: str }      // disk_id 0: not about a disk
//! Nack          = 10 { disk_id: u64, from_lsn: u64, code: u16, reason: str }  // resend from from_lsn
//! Detach        = 11 { disk_id: u64 }
//! RemoteDurable = 0x8001 { disk_id: u64, lsn: u64 }  // ignorable: every item up to lsn is
//!                                                    // durable on the master target
//! ```
//! Disk id 0 is never a disk. LSNs start at 1; LSN 0 means "nothing yet".

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::{Error, Result};

/// Message types from this number up may be skipped by a peer that does not know them.
pub const IGNORABLE_TYPES_START: u16 = 0x8000;
/// Most writes in one batch: bounds the per-batch metadata a peer can make us parse.
pub const MAX_WRITES_PER_BATCH: usize = 8192;
/// Most block data in one batch. 8 MiB keeps a batch well inside one frame and lets a
/// process server keep tens of batches in flight on a long link in bounded memory.
pub const MAX_BATCH_DATA_LEN: usize = 8 << 20;
/// Most entries in an ack (one per disk; a master target serves at most 60).
pub const MAX_ACK_ENTRIES: usize = 4096;
/// Most digests in one digest list: 8 MiB of digests, so every list fits a frame by
/// construction (a reply that cannot be sent would stop every disk of its connection).
pub const MAX_DIGESTS_PER_LIST: usize = 256 * 1024;
/// Bytes of a digest list's fixed fields (disk id, block size, first block, count).
pub const DIGEST_LIST_HEADER_LEN: usize = 8 + 4 + 8 + 4;
const _: () = assert!(
    DIGEST_LIST_HEADER_LEN + MAX_DIGESTS_PER_LIST * 32 <= crate::frame::MAX_PAYLOAD_LEN,
    "the largest digest list fits one frame"
);
const _: () = assert!(
    BATCH_HEADER_LEN + MAX_WRITES_PER_BATCH * WRITE_META_LEN + MAX_BATCH_DATA_LEN
        <= crate::frame::MAX_PAYLOAD_LEN,
    "the largest write batch fits one frame"
);
/// Capability bit: the sender can decode zstd-compressed payloads.
pub const CAP_ZSTD: u32 = 1;

/// Bytes of a write's fixed metadata inside a batch (timestamp, offset, len, digest).
pub const WRITE_META_LEN: usize = 8 + 8 + 4 + 32;
/// Bytes of a batch's fixed header (disk id, first LSN, count).
pub const BATCH_HEADER_LEN: usize = 8 + 8 + 4;

/// Who is speaking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// A source agent.
    Agent = 1,
    /// A process server.
    ProcessServer = 2,
    /// A master target.
    MasterTarget = 3,
    /// An operator tool.
    Admin = 4,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Agent => "agent",
            Role::ProcessServer => "process-server",
            Role::MasterTarget => "master-target",
            Role::Admin => "operator",
        })
    }
}

/// Where the on-premises disk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum LocationKind {
    /// The disk still exists: `target` names its VMDK descriptor (or raw image).
    Original = 0,
    /// The disk is gone: create a new VMDK; `target` names the datastore directory.
    Alternate = 1,
}

/// The kind of a bookmark (and of the recovery point it makes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BookmarkKind {
    /// As if the power was cut at that instant.
    CrashConsistent = 0,
    /// Marked clean by the application.
    AppConsistent = 1,
    /// A resync of the disk begins: until it completes the target is inconsistent, and no
    /// recovery point may be made.
    ResyncStarted = 2,
    /// The resync is complete: the target equals the source as of this LSN.
    ResyncCompleted = 3,
}

/// Stable error codes carried in [`ErrorMsg`] and [`Nack`]. Fixed forever, never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// Protocol version ranges do not overlap.
    VersionMismatch = 1,
    /// The peer sent something malformed.
    Malformed = 2,
    /// The master target already has its maximum number of disks.
    DiskLimit = 3,
    /// Another attached disk has the same UUID.
    DuplicateUuid = 4,
    /// The disk is sparse, a snapshot/delta, or otherwise not writable consistently.
    UnsupportedDisk = 5,
    /// The disk file is locked by another process.
    DiskLocked = 6,
    /// The disk's size does not match.
    SizeMismatch = 7,
    /// A write falls outside the disk.
    OutOfRange = 8,
    /// A write's data does not match its digest: resend.
    DigestMismatch = 9,
    /// The disk is not attached.
    UnknownDisk = 10,
    /// Not ready yet (for example, no master target connected); retry later.
    NotReady = 11,
    /// An internal failure; the message says more.
    Internal = 12,
    /// The cache is full; retry later.
    CacheFull = 13,
    /// A batch's LSN is not the next expected: resend from `from_lsn`.
    LsnGap = 14,
    /// Data of this disk was lost on the way (a corrupt cache record): resync it.
    ResyncRequired = 15,
    /// The peer's certificate does not allow this request (another VM's disk, an operator
    /// command from an agent, a role that may not connect here).
    Forbidden = 16,
    /// The disk was detached for failback: it is never attached or written again.
    Detached = 17,
    /// The service has too many connections now; retry later.
    Busy = 18,
}

/// Whether retrying the same request can succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Retrying may succeed (after a backoff): the peer is not ready, full or busy, or asks
    /// for a resend.
    Transient,
    /// Retrying the same request cannot succeed: an operator must change something.
    Permanent,
}

impl ErrorCode {
    fn from_u16(v: u16) -> Result<Self> {
        use ErrorCode::*;
        Ok(match v {
            1 => VersionMismatch,
            2 => Malformed,
            3 => DiskLimit,
            4 => DuplicateUuid,
            5 => UnsupportedDisk,
            6 => DiskLocked,
            7 => SizeMismatch,
            8 => OutOfRange,
            9 => DigestMismatch,
            10 => UnknownDisk,
            11 => NotReady,
            12 => Internal,
            13 => CacheFull,
            14 => LsnGap,
            15 => ResyncRequired,
            16 => Forbidden,
            17 => Detached,
            18 => Busy,
            _ => return Err(invalid("error code", v)),
        })
    }

    /// Whether a request refused with this code may succeed if retried. Callers decide by
    /// this, never by an error's text.
    pub fn retry(self) -> Retry {
        use ErrorCode::*;
        match self {
            DigestMismatch | NotReady | Internal | CacheFull | LsnGap | ResyncRequired | Busy => {
                Retry::Transient
            }
            VersionMismatch | Malformed | DiskLimit | DuplicateUuid | UnsupportedDisk
            | DiskLocked | SizeMismatch | OutOfRange | UnknownDisk | Forbidden | Detached => {
                Retry::Permanent
            }
        }
    }
}

/// Longest bookmark tag: it is stored with the point and printed to operators.
pub const MAX_TAG_LEN: usize = 256;

/// Checks a bookmark's tag: 1 to [`MAX_TAG_LEN`] bytes, no control characters (a tag is
/// printed in operators' terminals and logs: it may not forge a line or move a cursor).
pub fn validate_tag(tag: &str) -> Result<()> {
    validate_text("tag", tag, MAX_TAG_LEN)
}

/// Longest node id in a Hello.
pub const MAX_NODE_ID_LEN: usize = 255;

/// Checks text a peer sends that is shown to operators (a tag, a node id): 1 to `max`
/// bytes, no control characters.
pub fn validate_text(field: &'static str, text: &str, max: usize) -> Result<()> {
    let why = if text.is_empty() || text.len() > max {
        Some(format!("is {} bytes long (1 to {max})", text.len()))
    } else {
        text.chars()
            .find(|c| c.is_control())
            .map(|c| format!("holds the control character {c:?}"))
    };
    match why {
        Some(detail) => Err(Error::Invalid {
            field,
            detail: format!("the {field} {detail}"),
        }),
        None => Ok(()),
    }
}

/// Longest name (VM id, disk name, certificate identity) accepted from a peer.
pub const MAX_NAME_LEN: usize = 64;

/// Checks a name that a peer supplies and that ends up in file names, certificate URIs,
/// log fields and metric labels: 1 to [`MAX_NAME_LEN`] bytes of ASCII letters, digits and
/// `.`, `_`, `-`, `~` (URI-unreserved characters), neither `.` nor `..`. So a name never
/// holds a path separator, a control character, a quote or a NUL.
pub fn validate_name(field: &'static str, name: &str) -> Result<()> {
    let why = if name.is_empty() {
        Some("is empty".to_owned())
    } else if name.len() > MAX_NAME_LEN {
        Some(format!(
            "is {} bytes long (at most {MAX_NAME_LEN})",
            name.len()
        ))
    } else if name == "." || name == ".." {
        Some("may not be . or ..".to_owned())
    } else {
        name.chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '~')))
            .map(|c| format!("holds {c:?}: use letters, digits, '.', '_', '-' or '~'"))
    };
    match why {
        Some(detail) => Err(Error::Invalid {
            field,
            detail: format!("{name:?} {detail}"),
        }),
        None => Ok(()),
    }
}

/// First frame each way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Oldest protocol version the sender speaks.
    pub proto_min: u16,
    /// Newest protocol version the sender speaks.
    pub proto_max: u16,
    /// The sender's role.
    pub role: Role,
    /// Capability bits (`CAP_*`).
    pub capabilities: u32,
    /// The sender's node id (host name or configured id).
    pub node_id: String,
}

/// Attach (register) a disk for replication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskAttach {
    /// The disk's id in the data plane (non-zero).
    pub disk_id: u64,
    /// The VM it belongs to.
    pub vm_id: String,
    /// Its replication group ("" for none).
    pub group_id: String,
    /// The disk's UUID (`ddb.uuid`).
    pub disk_uuid: [u8; 16],
    /// Size in bytes.
    pub size_bytes: u64,
    /// Sector size in bytes (512 or 4096).
    pub sector_size: u32,
    /// Original or alternate location.
    pub location: LocationKind,
    /// The master target's path: the VMDK descriptor (original) or datastore dir (alternate).
    pub target: String,
}

/// One captured write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    /// Capture time, microseconds since the Unix epoch.
    pub timestamp_us: u64,
    /// Byte offset on the disk.
    pub offset: u64,
    /// blake3 of `data`, made where the write was captured.
    pub digest: [u8; 32],
    /// The bytes written (a zero-copy slice of the received frame).
    pub data: Bytes,
}

/// Consecutive writes of one disk; write i has LSN `first_lsn + i`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteBatch {
    /// The disk.
    pub disk_id: u64,
    /// LSN of the first write.
    pub first_lsn: u64,
    /// The writes, in LSN order.
    pub writes: Vec<Write>,
}

impl WriteBatch {
    /// LSN of the last write (the batch is never empty on the wire).
    pub fn last_lsn(&self) -> u64 {
        self.first_lsn + self.writes.len() as u64 - 1
    }

    /// Bytes of block data carried.
    pub fn data_len(&self) -> usize {
        self.writes.iter().map(|w| w.data.len()).sum()
    }
}

/// A consistency marker in a disk's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bookmark {
    /// The disk.
    pub disk_id: u64,
    /// The bookmark's own LSN: it covers every write with a smaller LSN.
    pub lsn: u64,
    /// Crash- or app-consistent.
    pub kind: BookmarkKind,
    /// When it was taken, microseconds since the Unix epoch.
    pub time_us: u64,
    /// Group-wide marker id for multi-VM consistency (0: none).
    pub group_marker: u64,
    /// The application's tag.
    pub tag: String,
}

/// Highest durable LSN of a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckEntry {
    /// The disk.
    pub disk_id: u64,
    /// Every item with an LSN up to this one is durable.
    pub durable_lsn: u64,
}

/// Durability acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// One entry per disk.
    pub entries: Vec<AckEntry>,
}

/// Ask for the per-block digests of a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DigestRequest {
    /// The disk.
    pub disk_id: u64,
    /// Block size in bytes.
    pub block_size: u32,
    /// First block.
    pub first_block: u64,
    /// Number of blocks.
    pub block_count: u32,
}

/// Per-block digests of a range of a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestList {
    /// The disk.
    pub disk_id: u64,
    /// Block size in bytes.
    pub block_size: u32,
    /// Block number of the first digest.
    pub first_block: u64,
    /// blake3 per block (the last block of a disk may be short).
    pub digests: Vec<[u8; 32]>,
}

/// An error, with a stable code and a human message that says what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorMsg {
    /// Stable code.
    pub code: ErrorCode,
    /// The disk concerned, 0 if none.
    pub disk_id: u64,
    /// What happened and what to do.
    pub message: String,
}

/// Negative acknowledgement: resend a disk's stream from an LSN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nack {
    /// The disk.
    pub disk_id: u64,
    /// Resend from this LSN.
    pub from_lsn: u64,
    /// Why.
    pub code: ErrorCode,
    /// Detail.
    pub reason: String,
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`DiskAttach`].
    DiskAttach(DiskAttach),
    /// See [`WriteBatch`].
    WriteBatch(WriteBatch),
    /// See [`Bookmark`].
    Bookmark(Bookmark),
    /// See [`Ack`].
    Ack(Ack),
    /// See [`DigestRequest`].
    DigestRequest(DigestRequest),
    /// See [`DigestList`].
    DigestList(DigestList),
    /// Liveness; `seq` echoes, `time_us` is the sender's clock.
    Heartbeat {
        /// Sequence number.
        seq: u64,
        /// Sender's time, microseconds since the Unix epoch.
        time_us: u64,
    },
    /// See [`ErrorMsg`].
    Error(ErrorMsg),
    /// See [`Nack`].
    Nack(Nack),
    /// Release a disk (its lock on the master target).
    Detach {
        /// The disk.
        disk_id: u64,
    },
    /// Process server to agent: every item of the disk up to `lsn` is durable on the master
    /// target (not only in the process server's cache, which [`Ack`] reports). Optional: an
    /// older agent skips it.
    RemoteDurable {
        /// The disk.
        disk_id: u64,
        /// Highest LSN durable on the master target.
        lsn: u64,
    },
    /// An optional message type this build does not know (type >= [`IGNORABLE_TYPES_START`]).
    Ignored {
        /// Its type number.
        msg_type: u16,
    },
}

/// Message type numbers. Fixed forever; never reuse a number.
pub mod types {
    /// [`super::Hello`]
    pub const HELLO: u16 = 1;
    /// [`super::DiskAttach`]
    pub const DISK_ATTACH: u16 = 2;
    /// [`super::WriteBatch`]
    pub const WRITE_BATCH: u16 = 3;
    /// [`super::Bookmark`]
    pub const BOOKMARK: u16 = 4;
    /// [`super::Ack`]
    pub const ACK: u16 = 5;
    /// [`super::DigestRequest`]
    pub const DIGEST_REQUEST: u16 = 6;
    /// [`super::DigestList`]
    pub const DIGEST_LIST: u16 = 7;
    /// Heartbeat
    pub const HEARTBEAT: u16 = 8;
    /// [`super::ErrorMsg`]
    pub const ERROR: u16 = 9;
    /// [`super::Nack`]
    pub const NACK: u16 = 10;
    /// Detach
    pub const DETACH: u16 = 11;
    /// RemoteDurable (ignorable)
    pub const REMOTE_DURABLE: u16 = 0x8001;
    const _: () = assert!(REMOTE_DURABLE >= super::IGNORABLE_TYPES_START);
}

fn invalid(field: &'static str, v: impl std::fmt::Display) -> Error {
    Error::Invalid {
        field,
        detail: format!("unexpected value {v}"),
    }
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

impl Message {
    /// The type number of this message.
    pub fn msg_type(&self) -> u16 {
        use types::*;
        match self {
            Message::Hello(_) => HELLO,
            Message::DiskAttach(_) => DISK_ATTACH,
            Message::WriteBatch(_) => WRITE_BATCH,
            Message::Bookmark(_) => BOOKMARK,
            Message::Ack(_) => ACK,
            Message::DigestRequest(_) => DIGEST_REQUEST,
            Message::DigestList(_) => DIGEST_LIST,
            Message::Heartbeat { .. } => HEARTBEAT,
            Message::Error(_) => ERROR,
            Message::Nack(_) => NACK,
            Message::Detach { .. } => DETACH,
            Message::RemoteDurable { .. } => REMOTE_DURABLE,
            Message::Ignored { msg_type } => *msg_type,
        }
    }

    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::DiskAttach(_) => "disk attach",
            Message::WriteBatch(_) => "write batch",
            Message::Bookmark(_) => "bookmark",
            Message::Ack(_) => "ack",
            Message::DigestRequest(_) => "digest request",
            Message::DigestList(_) => "digest list",
            Message::Heartbeat { .. } => "heartbeat",
            Message::Error(_) => "error",
            Message::Nack(_) => "nack",
            Message::Detach { .. } => "detach",
            Message::RemoteDurable { .. } => "remote durable",
            Message::Ignored { .. } => "ignored",
        }
    }

    /// Appends the payload encoding of this message to `dst`.
    pub fn encode_payload(&self, dst: &mut BytesMut) -> Result<()> {
        match self {
            Message::Hello(h) => {
                dst.put_u16(h.proto_min);
                dst.put_u16(h.proto_max);
                dst.put_u8(h.role as u8);
                dst.put_u32(h.capabilities);
                put_str(dst, &h.node_id)?;
            }
            Message::DiskAttach(a) => {
                dst.put_u64(a.disk_id);
                put_str(dst, &a.vm_id)?;
                put_str(dst, &a.group_id)?;
                dst.put_slice(&a.disk_uuid);
                dst.put_u64(a.size_bytes);
                dst.put_u32(a.sector_size);
                dst.put_u8(a.location as u8);
                put_str(dst, &a.target)?;
            }
            Message::WriteBatch(b) => {
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
                    dst.put_u64(w.timestamp_us);
                    dst.put_u64(w.offset);
                    dst.put_u32(w.data.len() as u32);
                    dst.put_slice(&w.digest);
                    dst.put_slice(&w.data);
                }
            }
            Message::Bookmark(m) => {
                dst.put_u64(m.disk_id);
                dst.put_u64(m.lsn);
                dst.put_u8(m.kind as u8);
                dst.put_u64(m.time_us);
                dst.put_u64(m.group_marker);
                put_str(dst, &m.tag)?;
            }
            Message::Ack(a) => {
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
            }
            Message::DigestRequest(r) => {
                dst.put_u64(r.disk_id);
                dst.put_u32(r.block_size);
                dst.put_u64(r.first_block);
                dst.put_u32(r.block_count);
            }
            Message::DigestList(l) => {
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
            }
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
        Ok(())
    }

    /// Decodes a message of type `msg_type` from its (decompressed) payload. Write data are
    /// zero-copy slices of `payload`.
    pub fn decode_payload(msg_type: u16, payload: Bytes) -> Result<Message> {
        use types::*;
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
            REMOTE_DURABLE => "remote durable",
            t if t >= IGNORABLE_TYPES_START => return Ok(Message::Ignored { msg_type: t }),
            t => return Err(Error::UnknownMessage(t)),
        };
        let mut r = Reader { buf: payload, what };
        let msg = match msg_type {
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
            DISK_ATTACH => Message::DiskAttach(DiskAttach {
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
            }),
            WRITE_BATCH => Message::WriteBatch(decode_batch(&mut r)?),
            BOOKMARK => Message::Bookmark(Bookmark {
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
            }),
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
            }),
            DIGEST_LIST => {
                let disk_id = r.u64()?;
                let block_size = r.u32()?;
                let first_block = r.u64()?;
                let n = r.count(MAX_DIGESTS_PER_LIST, 32)?;
                let mut digests = Vec::with_capacity(n);
                for _ in 0..n {
                    digests.push(r.array()?);
                }
                Message::DigestList(DigestList {
                    disk_id,
                    block_size,
                    first_block,
                    digests,
                })
            }
            HEARTBEAT => Message::Heartbeat {
                seq: r.u64()?,
                time_us: r.u64()?,
            },
            ERROR => Message::Error(ErrorMsg {
                code: ErrorCode::from_u16(r.u16()?)?,
                disk_id: r.u64()?,
                message: r.string("message")?,
            }),
            NACK => Message::Nack(Nack {
                disk_id: r.u64()?,
                from_lsn: r.u64()?,
                code: ErrorCode::from_u16(r.u16()?)?,
                reason: r.string("reason")?,
            }),
            DETACH => Message::Detach { disk_id: r.u64()? },
            REMOTE_DURABLE => Message::RemoteDurable {
                disk_id: r.u64()?,
                lsn: r.u64()?,
            },
            _ => unreachable!("type checked above"),
        };
        r.finish()?;
        Ok(msg)
    }
}

fn decode_batch(r: &mut Reader) -> Result<WriteBatch> {
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
        let len = r.u32()? as usize;
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
        let data = r.bytes(len)?;
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
