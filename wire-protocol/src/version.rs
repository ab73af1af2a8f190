//! Protocol version negotiation.
//!
//! Each side's first frame is a `Hello` carrying the range of protocol versions it speaks
//! (DRBD's `P_CONNECTION_FEATURES` habit). Both use the highest version in both ranges. A peer
//! whose range does not overlap gets an `Error` frame naming both ranges, then the
//! connection closes.
//!
//! Every frame a side sends after the Hellos is encoded in the negotiated version, and a
//! frame is decoded as the version in its header says, so a newer build keeps talking to an
//! older one (agents in many VMs are upgraded last).
//!
//! | version | what it adds |
//! |---|---|
//! | 1 | the first protocol |
//! | 2 | request ids on attach, digest request, digest list and error ([`crate::message`]) |
//! | 3 | replication groups: the attach's OS type, and [`crate::Cut`] (group-consistent cuts) |
//! | 4 | zero extents: a write of zeros is sent as its length alone ([`crate::message::ZERO_EXTENT`]) |
//! | 5 | stream chunks: payloads compressed as one zstd stream per connection ([`crate::frame::FLAG_ZSTD_STREAM`], [`crate::stream`]); payloads as in 4 |

use crate::{Error, Result};

/// The oldest protocol version this build speaks.
pub const PROTOCOL_VERSION_MIN: u16 = 1;
/// The newest protocol version this build speaks.
pub const PROTOCOL_VERSION_MAX: u16 = 5;
/// The first version whose requests and replies carry request ids.
pub const REQUEST_IDS_SINCE: u16 = 2;
/// The first version with replication groups: the attach's OS type and [`crate::Cut`].
pub const GROUPS_SINCE: u16 = 3;
/// The first version with zero extents in write batches.
pub const ZERO_EXTENTS_SINCE: u16 = 4;
/// The first version whose frames may carry chunks of a connection's zstd stream.
pub const STREAM_SINCE: u16 = 5;
const _: () = assert!(PROTOCOL_VERSION_MIN <= PROTOCOL_VERSION_MAX);
const _: () = assert!(
    PROTOCOL_VERSION_MIN >= 1,
    "version 0 is never valid on the wire"
);

/// The version two peers speak: the highest one in both ranges.
pub fn negotiate(ours: (u16, u16), theirs: (u16, u16)) -> Result<u16> {
    let low = ours.0.max(theirs.0);
    let high = ours.1.min(theirs.1);
    if theirs.0 > theirs.1 || low > high {
        return Err(Error::VersionMismatch {
            ours_min: ours.0,
            ours_max: ours.1,
            theirs_min: theirs.0,
            theirs_max: theirs.1,
        });
    }
    Ok(high)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_highest_common() {
        assert_eq!(negotiate((1, 3), (2, 5)).unwrap(), 3);
        assert_eq!(negotiate((1, 1), (1, 1)).unwrap(), 1);
    }

    #[test]
    fn disjoint_ranges_name_both() {
        let e = negotiate((1, 2), (3, 4)).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("1..=2") && text.contains("3..=4"), "{text}");
        assert!(
            negotiate((1, 2), (2, 1)).is_err(),
            "an inverted range is refused"
        );
    }
}
