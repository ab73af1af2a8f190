//! Messages and their payload layouts.
//!
//! Type numbers are fixed forever and never reused (DRBD's habit); numbers from
//! [`IGNORABLE_TYPES_START`] up are optional messages an older peer may skip. All integers are
//! big-endian. `str` is `{ len: u16, utf8: [u8; len] }`. A payload is laid out as the version
//! in its frame header says ([`crate::frame`]); the layouts below are version 2's, and a field
//! marked `v2:` is absent in version 1 (it reads as 0 there), one marked `v3:` absent before
//! version 3 (it reads as empty), and a message marked `v3` is never sent to an older peer.
//!
//! ```text
//! Hello         = 1  { proto_min: u16, proto_max: u16, role: u8, capabilities: u32, node_id: str }
//! DiskAttach    = 2  { disk_id: u64, vm_id: str, group_id: str, disk_uuid: [u8; 16],
//!                      size_bytes: u64, sector_size: u32, location: u8, target: str,
//!                      v2: request_id: u64, v3: os_type: str }
//! WriteBatch    = 3  { disk_id: u64, first_lsn: u64, count: u32,
//!                      writes: [{ timestamp_us: u64, offset: u64, len: u32,
//!                                 digest: [u8; 32], data: [u8; len] }; count] }
//!                    // write i has LSN first_lsn + i; digest = blake3(data), made at capture
//!                    // v4: len's top bit (ZERO_EXTENT) set: `data` is absent and is len & !ZERO_EXTENT
//!                    // zeros (a never-written region: a resync of a thin disk sends its
//!                    // holes in 52 bytes per write, not their size)
//! Bookmark      = 4  { disk_id: u64, lsn: u64, kind: u8, time_us: u64, group_marker: u64, tag: str,
//!                      v3: group_members: u32 }
//!                    // a bookmark takes an LSN of its own in the disk's stream
//! Ack           = 5  { count: u32, entries: [{ disk_id: u64, durable_lsn: u64 }; count] }
//! DigestRequest = 6  { disk_id: u64, block_size: u32, first_block: u64, block_count: u32,
//!                      v2: request_id: u64 }
//! DigestList    = 7  { disk_id: u64, block_size: u32, first_block: u64, count: u32,
//!                      digests: [[u8; 32]; count], v2: request_id: u64 }
//! Heartbeat     = 8  { seq: u64, time_us: u64 }
//! Error         = 9  { code: u16, disk_id: u64, message: str,     // disk_id 0: not about a disk
//!                      v2: request_id: u64 }                      // 0: not a reply to a request
//! Nack          = 10 { disk_id: u64, from_lsn: u64, code: u16, reason: str }  // resend from from_lsn
//! Detach        = 11 { disk_id: u64 }
//! Cut           = 12 { phase: u8, disk_id: u64, cut_id: u64, lsn: u64, flags: u8,   // v3
//!                      hold_us: u64, tag: str }
//!                    // a group-consistent cut, in two phases (process-server/src/groups.rs):
//!                    // Hold (1, PS→agent) → Held (2, lsn: the last LSN before the hold) or
//!                    // Refused (6, tag: why); then Mark (3, PS→agent, tag, lsn: how many
//!                    // disks the cut covers, for the marker's group_members) → Marked (5, lsn:
//!                    // the marker bookmark's, hold_us: how long writes waited) or Release
//!                    // (4, PS→agent: the cut is abandoned, take no marker), answered by
//!                    // Released (7, hold_us), also sent when the agent's own hold limit
//!                    // ends a hold. flags bit 0: app-consistent.
//! RemoteDurable = 0x8001 { disk_id: u64, lsn: u64 }  // ignorable: every item up to lsn is
//!                                                    // durable on the master target
//! ```
//! Disk id 0 is never a disk. LSNs start at 1; LSN 0 means "nothing yet".
//!
//! # Request ids (version 2)
//! A requester numbers its requests (attach, digest request) with ids unique on its
//! connection (never 0), and the reply, a digest list or an error, carries the id of the
//! request it answers: a requester with several requests in flight, for several disks or
//! several of one disk, gives each answer to the request it belongs to, and an error that
//! answers no request (id 0) is never taken for an answer. An attach that succeeds is
//! answered by an [`Ack`] of its disk (one attach of a disk is in flight at a time).

pub(crate) mod payload;

use bytes::Bytes;

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
/// Bytes of a digest list's fixed fields (disk id, block size, first block, count, and
/// version 2's request id).
pub const DIGEST_LIST_HEADER_LEN: usize = 8 + 4 + 8 + 4 + 8;
const _: () = assert!(
    DIGEST_LIST_HEADER_LEN + MAX_DIGESTS_PER_LIST * 32 <= crate::frame::MAX_PAYLOAD_LEN,
    "the largest digest list fits one frame"
);
const _: () = assert!(
    BATCH_HEADER_LEN + MAX_WRITES_PER_BATCH * WRITE_META_LEN + MAX_BATCH_DATA_LEN
        <= crate::frame::MAX_PAYLOAD_LEN,
    "the largest write batch fits one frame"
);
/// A write's `len` with this bit set (version 4) carries no data: the write is that many
/// zeros. A length never reaches it ([`MAX_BATCH_DATA_LEN`]).
pub const ZERO_EXTENT: u32 = 1 << 31;
const _: () = assert!((MAX_BATCH_DATA_LEN as u64) < ZERO_EXTENT as u64);
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
    pub(crate) fn from_u16(v: u16) -> Result<Self> {
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
    /// Numbers this request on its connection (version 2; 0: none). See the module doc.
    pub request_id: u64,
    /// The VM's operating system ("linux", "windows"; version 3, "" before: unknown). Every
    /// VM of a replication group has the same one.
    pub os_type: String,
}

/// The step of a group-consistent cut a [`Cut`] message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CutPhase {
    /// Process server to agent: hold new writes and say where the stream stands.
    Hold = 1,
    /// Agent to process server: holding; `lsn` is the last LSN before the hold.
    Held = 2,
    /// Process server to agent: every member holds; put the marker in the stream, go on.
    Mark = 3,
    /// Process server to agent: the cut is abandoned; go on without a marker.
    Release = 4,
    /// Agent to process server: the marker is in the stream at `lsn`; writes waited
    /// `hold_us`.
    Marked = 5,
    /// Agent to process server: this disk cannot take part (`tag` says why).
    Refused = 6,
    /// Agent to process server: it went on without a marker (released, or its own hold
    /// limit passed) after holding writes `hold_us`.
    Released = 7,
}

/// Flag of a [`Cut`]: app-consistent (filesystems frozen while held).
pub const CUT_APP_CONSISTENT: u8 = 1;

/// One step of a group-consistent cut (version 3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    /// Which step.
    pub phase: CutPhase,
    /// The disk (the connection's).
    pub disk_id: u64,
    /// The cut: unique per process server, carried as the marker's `group_marker`.
    pub cut_id: u64,
    /// Held: the last LSN before the hold; Mark: how many disks the cut covers; Marked: the
    /// marker's LSN; else 0.
    pub lsn: u64,
    /// [`CUT_APP_CONSISTENT`].
    pub flags: u8,
    /// Marked, Released: how long new writes waited, microseconds; else 0.
    pub hold_us: u64,
    /// Mark: the bookmark's tag; Refused: why; else "".
    pub tag: String,
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
    /// How many disks the group's cut covers (version 3; 0: none, or an older peer): the
    /// master target's group point needs the marker on exactly that many disks.
    pub group_members: u32,
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
    /// Numbers this request on its connection (version 2; 0: none). See the module doc.
    pub request_id: u64,
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
    /// The id of the request this answers (version 2; 0: none).
    pub request_id: u64,
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
    /// The id of the request this answers (version 2; 0: not an answer to a request).
    pub request_id: u64,
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
    /// See [`Cut`] (version 3).
    Cut(Cut),
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
    /// [`super::Cut`] (version 3)
    pub const CUT: u16 = 12;
    /// RemoteDurable (ignorable)
    pub const REMOTE_DURABLE: u16 = 0x8001;
    const _: () = assert!(REMOTE_DURABLE >= super::IGNORABLE_TYPES_START);
}

pub(crate) fn invalid(field: &'static str, v: impl std::fmt::Display) -> Error {
    Error::Invalid {
        field,
        detail: format!("unexpected value {v}"),
    }
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
            Message::Cut(_) => CUT,
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
            Message::Cut(_) => "cut",
            Message::RemoteDurable { .. } => "remote durable",
            Message::Ignored { .. } => "ignored",
        }
    }

    /// The request id of a request or of a reply to one (0: none, or a version-1 peer).
    pub fn request_id(&self) -> u64 {
        match self {
            Message::DiskAttach(a) => a.request_id,
            Message::DigestRequest(r) => r.request_id,
            Message::DigestList(l) => l.request_id,
            Message::Error(e) => e.request_id,
            _ => 0,
        }
    }

    /// Sets the request id of a request or reply (nothing for other messages).
    pub fn set_request_id(&mut self, id: u64) {
        match self {
            Message::DiskAttach(a) => a.request_id = id,
            Message::DigestRequest(r) => r.request_id = id,
            Message::DigestList(l) => l.request_id = id,
            Message::Error(e) => e.request_id = id,
            _ => {}
        }
    }
}
