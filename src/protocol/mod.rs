//! The NATS client wire protocol: parsing what clients send, encoding what the
//! server sends back, and the JSON bodies of `INFO` and `CONNECT`.
//!
//! This module does no I/O and knows nothing of server state. Every function is
//! a pure transformation between bytes and typed operations, so it can be tested
//! and fuzzed without sockets.
//!
//! Invariants:
//! - Parsing never copies a payload: [`Message::payload`] is a `Bytes` slice of
//!   the read buffer the op was parsed from (and [`Message::pins`] how much
//!   memory that keeps alive, once the reader has said).
//! - Parsing gives the same ops however the input is split into reads: the
//!   parser consumes nothing until a whole op (control line and payload) is
//!   buffered.
//! - Error texts are the ones nats-server sends, in [`ProtocolError`]'s
//!   `Display`, so `-ERR` lines are written in exactly one place.

mod encode;
pub mod headers;
mod info;
mod parse;

pub use encode::{
    encode_connect, encode_err, encode_info, encode_msg_header, encode_pub_header, encode_sub,
    encode_unsub, CRLF, OK, PING, PONG,
};
pub use info::{ConnectOptions, ServerInfo};
pub use parse::{parse_client_op, parse_server_op, Limits};
// Building blocks the cluster's route protocol shares with this one.
pub(crate) use encode::{json_line, sizes_tail};
pub(crate) use parse::{line, parse_size, payload_len};

use std::fmt;
use std::ops::Range;

use bytes::Bytes;

/// One message as published or delivered: a subject, an optional reply
/// subject and a body (with headers, the body starts with the `NATS/1.0`
/// header block of `header_len` bytes).
///
/// All parts are views into one shared `Bytes` (for a parsed op, the op's own
/// bytes in the read buffer), so a message costs one reference count however
/// many parts are looked at, and [`Message::payload_bytes`] shares the body
/// without copying.
///
/// A view keeps the whole allocation behind `buf` alive (for a parsed op,
/// the read buffer it arrived in), which may be much larger than the
/// message: [`Message::pins`] says how large, so that whoever keeps the body
/// for long (an outbound queue) can copy it instead.
#[derive(Clone)]
pub struct Message {
    buf: Bytes,
    subject: Range<usize>,
    reply: Option<Range<usize>>,
    payload: Range<usize>,
    header_len: Option<usize>,
    /// An upper bound of the bytes `buf`'s allocation holds.
    pins: usize,
}

impl Message {
    /// A message from separate parts, copied into one buffer (for messages
    /// the server makes itself, and tests).
    pub fn new(
        subject: &[u8],
        reply: Option<&[u8]>,
        header_len: Option<usize>,
        payload: &[u8],
    ) -> Message {
        let mut buf =
            Vec::with_capacity(subject.len() + reply.map_or(0, <[u8]>::len) + payload.len());
        let mut part = |bytes: &[u8]| {
            let start = buf.len();
            buf.extend_from_slice(bytes);
            start..buf.len()
        };
        let subject = part(subject);
        let reply = reply.map(&mut part);
        let payload = part(payload);
        Message {
            pins: buf.capacity(),
            buf: Bytes::from(buf),
            subject,
            reply,
            payload,
            header_len,
        }
    }

    /// A message whose parts are the given ranges of `buf` (the parser's
    /// zero-copy constructor). The ranges must lie within `buf`.
    ///
    /// How much memory `buf` keeps alive is unknown here, so it is taken to
    /// be unbounded until [`Message::set_pins`] says otherwise.
    pub(crate) fn from_parts(
        buf: Bytes,
        subject: Range<usize>,
        reply: Option<Range<usize>>,
        header_len: Option<usize>,
        payload: Range<usize>,
    ) -> Message {
        Message {
            buf,
            subject,
            reply,
            payload,
            header_len,
            pins: usize::MAX,
        }
    }

    /// Bytes of memory this message's buffer keeps alive, at most (for a
    /// parsed one, the size of the read buffer it was cut from, once its
    /// reader has said so; `usize::MAX` when unknown).
    pub fn pins(&self) -> usize {
        self.pins
    }

    /// Records that this message's buffer keeps at most `bytes` alive (the
    /// reader that parsed it knows its read buffer's size).
    pub fn set_pins(&mut self, bytes: usize) {
        self.pins = bytes;
    }

    pub fn subject(&self) -> &[u8] {
        &self.buf[self.subject.clone()]
    }

    /// The subject as shared `Bytes` (no copy).
    pub fn subject_bytes(&self) -> Bytes {
        self.buf.slice(self.subject.clone())
    }

    pub fn reply(&self) -> Option<&[u8]> {
        self.reply.clone().map(|r| &self.buf[r])
    }

    /// Length of the header block at the start of the payload, or `None`
    /// for a message without headers (PUB/MSG).
    pub fn header_len(&self) -> Option<usize> {
        self.header_len
    }

    /// The whole body, header block included.
    pub fn payload(&self) -> &[u8] {
        &self.buf[self.payload.clone()]
    }

    /// The whole body as shared `Bytes` (no copy).
    pub fn payload_bytes(&self) -> Bytes {
        self.buf.slice(self.payload.clone())
    }

    /// The header block (empty without headers).
    pub fn headers(&self) -> &[u8] {
        &self.payload()[..self.header_len.unwrap_or(0)]
    }

    /// The body without its header block.
    pub fn data(&self) -> &[u8] {
        &self.payload()[self.header_len.unwrap_or(0)..]
    }
}

impl PartialEq for Message {
    fn eq(&self, other: &Self) -> bool {
        self.subject() == other.subject()
            && self.reply() == other.reply()
            && self.header_len == other.header_len
            && self.payload() == other.payload()
    }
}

impl Eq for Message {}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("subject", &Bytes::copy_from_slice(self.subject()))
            .field("reply", &self.reply().map(Bytes::copy_from_slice))
            .field("header_len", &self.header_len)
            .field("payload", &Bytes::copy_from_slice(self.payload()))
            .finish()
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
