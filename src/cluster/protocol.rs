//! The route protocol: what two nodes say to each other, as bytes.
//!
//! The verbs and their arguments are nats-server's route protocol (one
//! account, `$G`), so that the design can later interoperate:
//!
//! ```text
//! INFO {json}                        who I am, my client URL, my peers (gossip)
//! CONNECT {json}                     the dialling node's id and credentials
//! RS+ $G subject [queue weight]      my clients want `subject` (weight: members)
//! RS- $G subject [queue]             they no longer do
//! RMSG $G subject [reply] size       a message for your subscribers ...
//! RMSG $G subject + reply q1 q2 size ... and for one member of queues q1, q2
//! RMSG $G subject | q1 q2 size       ... same, without a reply subject
//! HMSG $G subject [..] hdr_size size the same with headers
//! PING, PONG, +OK, -ERR 'text'
//! ```
//!
//! The parser follows the client parser's contract (see
//! [`crate::protocol`]): nothing is consumed until a whole op has arrived,
//! so the result does not depend on how the input was split into reads, and
//! a message's payload is a zero-copy slice of the read buffer. The queue
//! names of an `RMSG` stay one slice of text ([`RouteOp::Msg::queues`]), so
//! a message for any number of queue groups costs no allocation.

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::protocol::{
    json_line, line, parse_size, payload_len, sizes_tail, ConnectOptions, Limits, Message,
    ProtocolError, CRLF,
};

/// One operation a peer sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteOp {
    Info(Bytes),
    Connect(Bytes),
    /// `RS+`: the peer has interest in `subject` (for queue group `queue`
    /// with `weight` members).
    Interest {
        subject: Bytes,
        queue: Option<(Bytes, u32)>,
    },
    /// `RS-`: that interest is gone.
    NoInterest {
        subject: Bytes,
        queue: Option<Bytes>,
    },
    /// `RMSG`/`HMSG`: a message to deliver here. `queues` holds the names of
    /// the queue groups (space-separated) one of whose members here must get
    /// it; empty when the message is for plain subscribers only.
    Msg {
        message: Message,
        queues: Bytes,
    },
    Ping,
    Pong,
    Ok,
    Err(Bytes),
}

/// What a node says about itself in `INFO`, first when a route opens and
/// again whenever its set of peers changes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteInfo {
    pub server_id: String,
    #[serde(default)]
    pub server_name: String,
    pub cluster: String,
    /// `host:port` of its route listener (host may be a wildcard address:
    /// the receiver then uses the address the route came from).
    pub route_addr: String,
    /// `host:port` its clients connect to (same rule for the host).
    pub client_addr: String,
    #[serde(default)]
    pub auth_required: bool,
    /// The nodes it has routes to: the gossip that forms the full mesh.
    #[serde(default)]
    pub peers: Vec<Peer>,
}

/// A node as gossiped: its id and where to dial its route listener.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub server_id: String,
    pub route_addr: String,
}

/// What the dialling node says in `CONNECT`: who it is, and the route
/// credentials (in a client CONNECT's fields, so one authenticator checks
/// both kinds of connection).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RouteConnect {
    pub server_id: String,
    pub cluster: String,
    #[serde(flatten)]
    pub credentials: ConnectOptions,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verb {
    Info,
    Connect,
    Interest,
    NoInterest,
    Msg,
    HMsg,
    Ping,
    Pong,
    Ok,
    Err,
}

const VERBS: [(&[u8], Verb); 10] = [
    (b"RMSG", Verb::Msg),
    (b"HMSG", Verb::HMsg),
    (b"RS+", Verb::Interest),
    (b"RS-", Verb::NoInterest),
    (b"PING", Verb::Ping),
    (b"PONG", Verb::Pong),
    (b"INFO", Verb::Info),
    (b"CONNECT", Verb::Connect),
    (b"+OK", Verb::Ok),
    (b"-ERR", Verb::Err),
];

impl Verb {
    fn name(self) -> &'static str {
        match self {
            Verb::Info => "INFO",
            Verb::Connect => "CONNECT",
            Verb::Interest => "RS+",
            Verb::NoInterest => "RS-",
            Verb::Msg => "RMSG",
            Verb::HMsg => "HMSG",
            Verb::Ping => "PING",
            Verb::Pong => "PONG",
            Verb::Ok => "+OK",
            Verb::Err => "-ERR",
        }
    }
}

fn is_blank(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// The blank-separated words of `text`, as ranges relative to `base`.
fn words<'a>(base: usize, text: &'a [u8]) -> impl Iterator<Item = Range<usize>> + 'a {
    let mut at = 0;
    std::iter::from_fn(move || {
        while at < text.len() && is_blank(text[at]) {
            at += 1;
        }
        if at == text.len() {
            return None;
        }
        let start = at;
        while at < text.len() && !is_blank(text[at]) {
            at += 1;
        }
        Some(base + start..base + at)
    })
}

/// The words of a control line that matter: the first four, the last two,
/// and how many there are (an `RMSG` may name any number of queues).
struct Words {
    first: [Range<usize>; 4],
    last: [Range<usize>; 2],
    count: usize,
}

impl Words {
    fn split(base: usize, text: &[u8]) -> Words {
        let mut w = Words {
            first: Default::default(),
            last: Default::default(),
            count: 0,
        };
        for range in words(base, text) {
            if let Some(slot) = w.first.get_mut(w.count) {
                *slot = range.clone();
            }
            w.last = [w.last[1].clone(), range];
            w.count += 1;
        }
        w
    }
}

/// Parses the next route op from the front of `buf`, removing its bytes.
/// `Ok(None)`: the op is not complete yet and `buf` is untouched.
pub fn parse_route_op(
    buf: &mut BytesMut,
    limits: &Limits,
) -> Result<Option<RouteOp>, ProtocolError> {
    let (after_line, body) = match line(buf) {
        Ok(done) => done,
        Err(_) if buf.len() > limits.max_control_line.saturating_add(1) => {
            return Err(ProtocolError::MaxControlLine)
        }
        Err(_) => return Ok(None),
    };
    if body.len() > limits.max_control_line {
        return Err(ProtocolError::MaxControlLine);
    }
    let line_len = buf.len() - after_line.len();
    let verb_end = body.iter().position(|&b| is_blank(b)).unwrap_or(body.len());
    let verb = VERBS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(&body[..verb_end]))
        .map(|(_, verb)| *verb)
        .ok_or(ProtocolError::UnknownOperation)?;
    let words = Words::split(verb_end, &body[verb_end..]);
    let text_start = words.first[0].start;
    let bad = || ProtocolError::InvalidArguments(verb.name());
    let (op_len, payload) = match verb {
        Verb::Msg | Verb::HMsg => {
            let sizes = if verb == Verb::HMsg { 2 } else { 1 };
            if words.count < 2 + sizes {
                return Err(bad());
            }
            let total = size(body, &words.last[1]).ok_or_else(bad)?;
            let Some(len) = payload_len(after_line, total, limits)? else {
                return Ok(None);
            };
            (line_len + len, Some(total))
        }
        _ => (line_len, None),
    };
    let chunk = buf.split_to(op_len).freeze();
    let arg = |i: usize| chunk.slice(words.first[i].clone());
    let op = match verb {
        Verb::Info | Verb::Connect | Verb::Err => {
            if words.count == 0 {
                return Err(bad());
            }
            let text = chunk.slice(text_start..body_len(&chunk, line_len));
            match verb {
                Verb::Info => RouteOp::Info(text),
                Verb::Connect => RouteOp::Connect(text),
                _ => RouteOp::Err(text),
            }
        }
        Verb::Ping | Verb::Pong | Verb::Ok => match (verb, words.count) {
            (Verb::Ping, 0) => RouteOp::Ping,
            (Verb::Pong, 0) => RouteOp::Pong,
            (Verb::Ok, 0) => RouteOp::Ok,
            _ => return Err(bad()),
        },
        Verb::Interest => match words.count {
            2 => RouteOp::Interest {
                subject: arg(1),
                queue: None,
            },
            4 => {
                let weight = size(&chunk, &words.first[3])
                    .and_then(|w| u32::try_from(w).ok())
                    .ok_or_else(bad)?;
                RouteOp::Interest {
                    subject: arg(1),
                    queue: Some((arg(2), weight)),
                }
            }
            _ => return Err(bad()),
        },
        Verb::NoInterest => match words.count {
            2 | 3 => RouteOp::NoInterest {
                subject: arg(1),
                queue: (words.count == 3).then(|| arg(2)),
            },
            _ => return Err(bad()),
        },
        Verb::Msg | Verb::HMsg => {
            let total = payload.unwrap_or_default();
            msg(&chunk, &words, verb, line_len, total).ok_or_else(bad)?
        }
    };
    Ok(Some(op))
}

/// The end of a control line's text within `chunk` (before `\r\n`).
fn body_len(chunk: &[u8], line_len: usize) -> usize {
    let end = line_len - 1;
    if end > 0 && chunk[end - 1] == b'\r' {
        end - 1
    } else {
        end
    }
}

fn size(text: &[u8], range: &Range<usize>) -> Option<usize> {
    parse_size(&text[range.clone()])
}

/// Builds an `RMSG`/`HMSG` from its words: account, subject, then a reply,
/// `+ reply queues...` or `| queues...`, then the size(s).
fn msg(chunk: &Bytes, words: &Words, verb: Verb, line_len: usize, total: usize) -> Option<RouteOp> {
    let sizes = if verb == Verb::HMsg { 2 } else { 1 };
    let header_len = match verb {
        Verb::HMsg => match size(chunk, &words.last[0])? {
            h if h <= total => Some(h),
            _ => return None,
        },
        _ => None,
    };
    let middle = words.count - 2 - sizes;
    let word = |i: usize| &chunk[words.first[i].clone()];
    let (reply, queues) = match middle {
        0 => (None, 0..0),
        // One word is the reply, whatever it is: a reply subject may be `+`
        // or `|` (nats-server reads it so, and `encode_msg_line` writes it
        // so when there are no queues).
        1 => (Some(words.first[2].clone()), 0..0),
        _ if word(2) == b"+" => {
            let reply = words.first[3].clone();
            (
                Some(reply.clone()),
                queue_span(words, reply.end, sizes, middle > 2),
            )
        }
        _ if word(2) == b"|" => (None, queue_span(words, words.first[2].end, sizes, true)),
        _ => return None,
    };
    let queues = trim(chunk, queues);
    let message = Message::from_parts(
        chunk.clone(),
        words.first[1].clone(),
        reply,
        header_len,
        line_len..line_len + total,
    );
    Some(RouteOp::Msg {
        queues: chunk.slice(queues),
        message,
    })
}

/// The text between `from` and the first size word: the queue names.
fn queue_span(words: &Words, from: usize, sizes: usize, any: bool) -> Range<usize> {
    let first_size = if sizes == 2 {
        words.last[0].start
    } else {
        words.last[1].start
    };
    if any {
        from..first_size
    } else {
        0..0
    }
}

fn trim(text: &[u8], mut range: Range<usize>) -> Range<usize> {
    while range.start < range.end && is_blank(text[range.start]) {
        range.start += 1;
    }
    while range.end > range.start && is_blank(text[range.end - 1]) {
        range.end -= 1;
    }
    range
}

/// Whether `queues` (as carried by an `RMSG`) names `queue`.
pub fn names_queue(queues: &[u8], queue: &[u8]) -> bool {
    queues
        .split(|&b| is_blank(b))
        .any(|name| !name.is_empty() && name == queue)
}

/// `INFO {json}` of a route.
pub fn encode_route_info(buf: &mut BytesMut, info: &RouteInfo) {
    json_line(buf, b"INFO ", info);
}

/// `CONNECT {json}` of a route.
pub fn encode_route_connect(buf: &mut BytesMut, connect: &RouteConnect) {
    json_line(buf, b"CONNECT ", connect);
}

/// `RS+ $G subject [queue weight]`.
pub fn encode_interest(buf: &mut BytesMut, subject: &[u8], queue: Option<(&[u8], u32)>) {
    buf.put_slice(b"RS+ $G ");
    buf.put_slice(subject);
    if let Some((queue, weight)) = queue {
        buf.put_u8(b' ');
        buf.put_slice(queue);
        buf.put_u8(b' ');
        buf.put_slice(itoa::Buffer::new().format(weight).as_bytes());
    }
    buf.put_slice(CRLF);
}

/// `RS- $G subject [queue]`.
pub fn encode_no_interest(buf: &mut BytesMut, subject: &[u8], queue: Option<&[u8]>) {
    buf.put_slice(b"RS- $G ");
    buf.put_slice(subject);
    if let Some(queue) = queue {
        buf.put_u8(b' ');
        buf.put_slice(queue);
    }
    buf.put_slice(CRLF);
}

/// An upper bound of the control line [`encode_msg_line`] writes.
pub fn msg_line_bound(msg: &Message, queues: &[&[u8]]) -> usize {
    let names: usize = queues.iter().map(|q| q.len() + 1).sum();
    40 + msg.subject().len() + msg.reply().map_or(0, <[u8]>::len) + names
}

/// The control line of a forwarded message (its payload and CRLF follow
/// separately): `RMSG $G subject [reply] size`, the queue forms when
/// `queues` is not empty, and `HMSG` with a header size for a message with
/// headers.
pub fn encode_msg_line(buf: &mut BytesMut, msg: &Message, queues: &[&[u8]]) {
    let header_len = msg.header_len();
    buf.put_slice(if header_len.is_some() {
        b"HMSG $G "
    } else {
        b"RMSG $G "
    });
    buf.put_slice(msg.subject());
    let reply = match (msg.reply(), queues.is_empty()) {
        (reply, true) => reply,
        (Some(reply), false) => {
            buf.put_slice(b" + ");
            buf.put_slice(reply);
            None
        }
        (None, false) => {
            buf.put_slice(b" |");
            None
        }
    };
    for queue in queues {
        buf.put_u8(b' ');
        buf.put_slice(queue);
    }
    sizes_tail(buf, reply, header_len, msg.payload().len());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(bytes: &[u8]) -> Result<Vec<RouteOp>, ProtocolError> {
        let mut buf = BytesMut::from(bytes);
        let mut ops = Vec::new();
        while let Some(op) = parse_route_op(&mut buf, &Limits::default())? {
            ops.push(op);
        }
        assert!(buf.is_empty(), "left over: {buf:?}");
        Ok(ops)
    }

    fn one_msg(bytes: &[u8]) -> (Message, Bytes) {
        match parse_all(bytes).unwrap().pop() {
            Some(RouteOp::Msg { message, queues }) => (message, queues),
            other => panic!("not a message: {other:?}"),
        }
    }

    #[test]
    fn every_message_form_parses() {
        let (m, q) = one_msg(b"RMSG $G foo 5\r\nhello\r\n");
        assert_eq!(
            (m.subject(), m.reply(), m.payload(), &q[..]),
            (&b"foo"[..], None, &b"hello"[..], &b""[..])
        );
        let (m, q) = one_msg(b"RMSG $G foo bar 2\r\nhi\r\n");
        assert_eq!((m.reply(), &q[..]), (Some(&b"bar"[..]), &b""[..]));
        let (m, q) = one_msg(b"RMSG $G foo + bar q1 q2 2\r\nhi\r\n");
        assert_eq!((m.reply(), &q[..]), (Some(&b"bar"[..]), &b"q1 q2"[..]));
        let (m, q) = one_msg(b"RMSG $G foo | q1 2\r\nhi\r\n");
        assert_eq!((m.reply(), &q[..]), (None, &b"q1"[..]));
        let (m, q) = one_msg(b"HMSG $G foo | q1 12 14\r\nNATS/1.0\r\n\r\nhi\r\n");
        assert_eq!(
            (m.header_len(), m.data(), &q[..]),
            (Some(12), &b"hi"[..], &b"q1"[..])
        );
        assert!(names_queue(&q, b"q1") && !names_queue(&q, b"q"));
    }

    #[test]
    fn encoded_messages_parse_back() {
        type Case<'a> = (&'a [u8], Option<&'a [u8]>, Option<usize>, &'a [&'a [u8]]);
        let cases: [Case; 5] = [
            (b"a.b", None, None, &[]),
            (b"a.b", Some(b"_INBOX.1"), None, &[]),
            (b"a.b", Some(b"_INBOX.1"), None, &[b"workers", b"audit"]),
            (b"a.b", None, Some(12), &[b"workers"]),
            (b"a.b", Some(b"r"), Some(12), &[]),
        ];
        for (subject, reply, header_len, queues) in cases {
            let data: &[u8] = if header_len.is_some() {
                b"NATS/1.0\r\n\r\nbody"
            } else {
                b"body"
            };
            let msg = Message::new(subject, reply, header_len, data);
            let mut buf = BytesMut::new();
            encode_msg_line(&mut buf, &msg, queues);
            assert!(buf.len() <= msg_line_bound(&msg, queues));
            buf.put_slice(msg.payload());
            buf.put_slice(CRLF);
            let (back, names) = one_msg(&buf);
            assert_eq!(back, msg);
            let names: Vec<&[u8]> = names
                .split(|&b| b == b' ')
                .filter(|n| !n.is_empty())
                .collect();
            assert_eq!(names, queues);
        }
    }

    /// Regression (found by tests/proptest_route_parser.rs): a reply subject
    /// of `+` or `|` with no queues was refused, though `encode_msg_line`
    /// writes it that way and nats-server reads it as the reply.
    #[test]
    fn a_reply_may_be_a_queue_marker() {
        for reply in [&b"+"[..], b"|"] {
            let msg = Message::new(b"foo", Some(reply), None, b"hi");
            let mut buf = BytesMut::new();
            encode_msg_line(&mut buf, &msg, &[]);
            buf.put_slice(msg.payload());
            buf.put_slice(CRLF);
            let (back, queues) = one_msg(&buf);
            assert_eq!((back, &queues[..]), (msg, &b""[..]));
        }
        let (m, q) = one_msg(b"RMSG $G foo + + q1 2\r\nhi\r\n");
        assert_eq!((m.reply(), &q[..]), (Some(&b"+"[..]), &b"q1"[..]));
    }

    /// Regression (found by tests/proptest_route_parser.rs): an incomplete
    /// line under a `max_control_line` of `usize::MAX` overflowed the length
    /// check (a panic in debug builds, and in release every partial line
    /// was refused as too long).
    #[test]
    fn unlimited_control_line_waits() {
        let limits = Limits {
            max_control_line: usize::MAX,
            max_payload: usize::MAX,
        };
        let mut buf = BytesMut::from(&b"RS+ $G foo"[..]);
        assert_eq!(parse_route_op(&mut buf, &limits), Ok(None));
        assert_eq!(&buf[..], b"RS+ $G foo");
    }

    #[test]
    fn interest_and_control_ops_parse() {
        let ops = parse_all(
            b"RS+ $G foo.*\r\nRS+ $G foo q 3\r\nRS- $G foo\r\nRS- $G foo q\r\nPING\r\nPONG\r\n+OK\r\n-ERR 'bad'\r\nINFO {\"a\": 1}\r\n",
        )
        .unwrap();
        assert_eq!(
            ops[0],
            RouteOp::Interest {
                subject: Bytes::from_static(b"foo.*"),
                queue: None
            }
        );
        assert_eq!(
            ops[1],
            RouteOp::Interest {
                subject: Bytes::from_static(b"foo"),
                queue: Some((Bytes::from_static(b"q"), 3))
            }
        );
        assert_eq!(
            ops[3],
            RouteOp::NoInterest {
                subject: Bytes::from_static(b"foo"),
                queue: Some(Bytes::from_static(b"q"))
            }
        );
        assert_eq!(ops[7], RouteOp::Err(Bytes::from_static(b"'bad'")));
        assert_eq!(ops[8], RouteOp::Info(Bytes::from_static(b"{\"a\": 1}")));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            &b"RMSG $G\r\n"[..],
            b"RMSG $G foo x\r\n",
            b"RMSG $G foo x y 5\r\nhello\r\n",
            b"HMSG $G foo 9 5\r\nhello\r\n",
            b"RS+ $G foo q\r\n",
            b"RS+ $G foo q -1\r\n",
            b"PING x\r\n",
            b"SUB foo 1\r\n",
            b"RMSG $G foo 5\r\nhelloX\r\n",
        ] {
            assert!(parse_all(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let mut long = BytesMut::from(&b"RS+ $G "[..]);
        long.extend_from_slice(&[b'a'; 5000]);
        assert_eq!(
            parse_route_op(&mut long, &Limits::default()),
            Err(ProtocolError::MaxControlLine)
        );
    }
}
