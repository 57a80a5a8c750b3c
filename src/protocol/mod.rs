//! The NATS client wire protocol: parsing what clients send, encoding what the
//! server sends back, and the JSON bodies of `INFO` and `CONNECT`.
//!
//! This module does no I/O and knows nothing of server state. Every function is
//! a pure transformation between bytes and typed operations, so it can be tested
//! and fuzzed without sockets.
//!
//! Invariants:
//! - Parsing never copies a payload: [`Message::payload`] is a `Bytes` slice of
//!   the read buffer the op was parsed from.
//! - Parsing gives the same ops however the input is split into reads: the
//!   parser consumes nothing until a whole op (control line and payload) is
//!   buffered.
//! - Error texts are the ones nats-server sends, in [`ProtocolError`]'s
//!   `Display`, so `-ERR` lines are written in exactly one place.

mod encode;
mod info;
mod parse;

pub use encode::{
    encode_connect, encode_err, encode_info, encode_msg_header, encode_pub_header, encode_sub,
    encode_unsub, CRLF, OK, PING, PONG,
};
pub use info::{ConnectOptions, ServerInfo};
pub use parse::{parse_client_op, parse_server_op, Limits};

use bytes::Bytes;

/// One message as published or delivered: the subject, an optional reply
/// subject, and the body. With headers, `payload` starts with the `NATS/1.0`
/// header block of `header_len` bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub subject: Bytes,
    pub reply: Option<Bytes>,
    /// Length of the header block at the start of `payload` (HPUB/HMSG), or
    /// `None` for a plain PUB/MSG.
    pub header_len: Option<usize>,
    pub payload: Bytes,
}

impl Message {
    /// The payload without its header block.
    pub fn data(&self) -> Bytes {
        self.payload.slice(self.header_len.unwrap_or(0)..)
    }

    /// The header block (empty without headers).
    pub fn headers(&self) -> &[u8] {
        &self.payload[..self.header_len.unwrap_or(0)]
    }
}

/// An operation a client sends to the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientOp {
    /// `CONNECT {json}`: the raw JSON, decoded by [`ConnectOptions::from_json`].
    Connect(Bytes),
    /// `PUB` or `HPUB`.
    Pub(Message),
    /// `SUB subject [queue] sid`.
    Sub {
        subject: Bytes,
        queue: Option<Bytes>,
        sid: Bytes,
    },
    /// `UNSUB sid [max_msgs]`.
    Unsub {
        sid: Bytes,
        max: Option<u64>,
    },
    Ping,
    Pong,
}

/// An operation a server sends to a client (used by Skiff's own client tools).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerOp {
    Info(Bytes),
    /// `MSG` or `HMSG` with the subscription id it was delivered for.
    Msg {
        sid: Bytes,
        message: Message,
    },
    Ok,
    Err(Bytes),
    Ping,
    Pong,
}

/// Why a byte stream is not valid protocol. `Display` gives the text of the
/// `-ERR` line the server sends, in nats-server's words where it has them.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The line does not start with a known verb, or a payload is not
    /// followed by CRLF.
    #[error("Unknown Protocol Operation")]
    UnknownOperation,
    /// A control line longer than `max_control_line`.
    #[error("maximum control line exceeded")]
    MaxControlLine,
    /// A PUB announcing more than `max_payload` bytes.
    #[error("Maximum Payload Violation")]
    MaxPayload,
    /// A known verb with the wrong number or form of arguments. nats-server
    /// closes such a client without a text; Skiff says what was wrong.
    #[error("Invalid Protocol Arguments for {0}")]
    InvalidArguments(&'static str),
}
