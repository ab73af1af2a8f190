//! The handshake: each side's first frame is a [`Hello`]; the server checks the client's and
//! answers with its own, or refuses with an error naming why. Pure: the services' shells
//! (`runtime::net`) move the frames and keep the time limits.
//!
//! ```text
//! client                                  server
//!   Hello { range, role, caps, node } -->   role allowed for the certificate? node id text?
//!                                            ranges overlap? a slot free?
//!                               <-- Hello   (or Error { code, message }, then close)
//! both: version = highest in both ranges; every later frame is in it
//! ```

use crate::message::{validate_text, ErrorMsg, MAX_NODE_ID_LEN};
use crate::version::{negotiate, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};
use crate::{ErrorCode, Hello, Message, Role, CAP_ZSTD};

/// Our Hello: the versions this build speaks, our role and name.
pub fn hello(role: Role, node_id: &str) -> Hello {
    Hello {
        proto_min: PROTOCOL_VERSION_MIN,
        proto_max: PROTOCOL_VERSION_MAX,
        role,
        capabilities: CAP_ZSTD,
        node_id: node_id.to_owned(),
    }
}

/// Why a server refuses a client's Hello (each kind is counted apart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not a Hello, or a Hello with a node id that is not printable text.
    Malformed(String),
    /// The Hello claims a role the certificate does not allow.
    Forbidden(String),
    /// The version ranges do not overlap.
    Version(String),
}

impl Refusal {
    /// The error frame the client gets before the connection closes.
    pub fn message(&self) -> Message {
        let (code, why) = match self {
            Refusal::Malformed(w) => (ErrorCode::Malformed, w),
            Refusal::Forbidden(w) => (ErrorCode::Forbidden, w),
            Refusal::Version(w) => (ErrorCode::VersionMismatch, w),
        };
        Message::Error(ErrorMsg {
            code,
            disk_id: 0,
            message: why.clone(),
            request_id: 0,
        })
    }

    /// What the refusal says.
    pub fn reason(&self) -> &str {
        match self {
            Refusal::Malformed(w) | Refusal::Forbidden(w) | Refusal::Version(w) => w,
        }
    }
}

/// The server's check of a client's first message: the negotiated version and the Hello, or
/// why not. `allowed` is the role the client's certificate permits, `identity` names it in
/// the refusal.
pub fn accept(first: Message, allowed: Role, identity: &str) -> Result<(u16, Hello), Refusal> {
    let hello = match first {
        Message::Hello(h) => h,
        m => {
            return Err(Refusal::Malformed(format!(
                "expected hello, got {}",
                m.name()
            )))
        }
    };
    validate_text("node id", &hello.node_id, MAX_NODE_ID_LEN)
        .map_err(|e| Refusal::Malformed(e.to_string()))?;
    if hello.role != allowed {
        return Err(Refusal::Forbidden(format!(
            "{identity} announced the role {}; its certificate allows {allowed}",
            hello.role
        )));
    }
    let version = negotiate(
        (PROTOCOL_VERSION_MIN, PROTOCOL_VERSION_MAX),
        (hello.proto_min, hello.proto_max),
    )
    .map_err(|e| Refusal::Version(e.to_string()))?;
    Ok((version, hello))
}

/// What the client makes of the server's answer to its Hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Welcome: speak this version.
    Version(u16),
    /// Refused, with the server's code and words.
    Refused(ErrorMsg),
    /// Neither: the server's answer makes no sense (or the ranges do not overlap).
    Invalid(String),
}

/// The client's reading of the server's first message.
pub fn answer(first: Message) -> Answer {
    match first {
        Message::Hello(h) => match negotiate(
            (PROTOCOL_VERSION_MIN, PROTOCOL_VERSION_MAX),
            (h.proto_min, h.proto_max),
        ) {
            Ok(v) => Answer::Version(v),
            Err(e) => Answer::Invalid(e.to_string()),
        },
        Message::Error(e) => Answer::Refused(e),
        m => Answer::Invalid(format!("expected hello, got {}", m.name())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(role: Role, range: (u16, u16), node: &str) -> Message {
        Message::Hello(Hello {
            proto_min: range.0,
            proto_max: range.1,
            role,
            capabilities: 0,
            node_id: node.into(),
        })
    }

    #[test]
    fn the_server_takes_the_highest_common_version_and_refuses_with_reasons() {
        let (v, h) = accept(from(Role::Agent, (1, 9), "vm1"), Role::Agent, "vm1").unwrap();
        assert_eq!((v, h.node_id.as_str()), (PROTOCOL_VERSION_MAX, "vm1"));
        assert_eq!(
            accept(from(Role::Agent, (1, 1), "vm1"), Role::Agent, "vm1")
                .unwrap()
                .0,
            1
        );
        assert!(matches!(
            accept(from(Role::ProcessServer, (1, 2), "x"), Role::Agent, "agent vm1"),
            Err(Refusal::Forbidden(w)) if w.contains("announced the role")
        ));
        assert!(matches!(
            accept(from(Role::Agent, (7, 9), "x"), Role::Agent, "vm1"),
            Err(Refusal::Version(_))
        ));
        assert!(matches!(
            accept(from(Role::Agent, (1, 2), "a\nb"), Role::Agent, "vm1"),
            Err(Refusal::Malformed(_))
        ));
        let not_hello = Message::Heartbeat { seq: 1, time_us: 0 };
        let r = accept(not_hello, Role::Agent, "vm1").unwrap_err();
        assert!(matches!(r.message(), Message::Error(e) if e.code == ErrorCode::Malformed));
    }

    #[test]
    fn the_client_reads_a_welcome_a_refusal_or_nonsense() {
        assert_eq!(
            answer(from(Role::ProcessServer, (1, 1), "ps")),
            Answer::Version(1)
        );
        assert!(matches!(
            answer(from(Role::ProcessServer, (8, 9), "ps")),
            Answer::Invalid(_)
        ));
        let refused = Refusal::Version("no".into()).message();
        assert!(
            matches!(answer(refused), Answer::Refused(e) if e.code == ErrorCode::VersionMismatch)
        );
        assert!(matches!(
            answer(Message::Detach { disk_id: 1 }),
            Answer::Invalid(_)
        ));
    }
}
