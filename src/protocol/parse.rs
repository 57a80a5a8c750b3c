//! The parser: bytes in, typed ops out.
//!
//! It is a small explicit state machine over one op at a time:
//! `line` (find the control line) → `verb` → `args` → payload → terminator,
//! written with `nom` streaming combinators so that "not enough bytes yet" is
//! an ordinary outcome (`Ok(None)`) rather than an error. Nothing is consumed
//! from the buffer until a whole op is present, which is what makes the result
//! independent of how the input was split into reads.
//!
//! Telnet users are welcome: verbs in any case, `\n` or `\r\n` line ends (after
//! payloads too), and runs of spaces or tabs between arguments.

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use nom::bytes::complete::take_till1;
use nom::character::complete::space0;
use nom::sequence::preceded;
use nom::{IResult, Needed, Parser};

use super::{ClientOp, Message, ProtocolError, ServerOp};

/// Size limits the parser enforces before buffering anything large.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest control line accepted (nats-server's `max_control_line`).
    pub max_control_line: usize,
    /// Largest payload accepted, headers included (`max_payload`).
    pub max_payload: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_control_line: 4096,
            max_payload: 1024 * 1024,
        }
    }
}

/// The most arguments any verb takes (`HMSG subject sid reply hdr total`).
const MAX_ARGS: usize = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verb {
    Connect,
    Pub,
    HPub,
    Sub,
    Unsub,
    Ping,
    Pong,
    Info,
    Msg,
    HMsg,
    Ok,
    Err,
}

impl Verb {
    fn name(self) -> &'static str {
        match self {
            Verb::Connect => "CONNECT",
            Verb::Pub => "PUB",
            Verb::HPub => "HPUB",
            Verb::Sub => "SUB",
            Verb::Unsub => "UNSUB",
            Verb::Ping => "PING",
            Verb::Pong => "PONG",
            Verb::Info => "INFO",
            Verb::Msg => "MSG",
            Verb::HMsg => "HMSG",
            Verb::Ok => "+OK",
            Verb::Err => "-ERR",
        }
    }

    /// Verbs a client may send; the rest are the server's.
    fn sent_by_client(self) -> bool {
        matches!(
            self,
            Verb::Connect
                | Verb::Pub
                | Verb::HPub
                | Verb::Sub
                | Verb::Unsub
                | Verb::Ping
                | Verb::Pong
        )
    }

    fn sent_by_server(self) -> bool {
        matches!(
            self,
            Verb::Info | Verb::Msg | Verb::HMsg | Verb::Ok | Verb::Err | Verb::Ping | Verb::Pong
        )
    }
}

const VERBS: [Verb; 12] = [
    Verb::Connect,
    Verb::Pub,
    Verb::HPub,
    Verb::Sub,
    Verb::Unsub,
    Verb::Ping,
    Verb::Pong,
    Verb::Info,
    Verb::Msg,
    Verb::HMsg,
    Verb::Ok,
    Verb::Err,
];

/// A control line: everything up to `\n`, without the line end. Streaming:
/// `Incomplete` until the `\n` has arrived.
pub(crate) fn line(input: &[u8]) -> IResult<&[u8], &[u8]> {
    match memchr::memchr(b'\n', input) {
        Some(end) => {
            let body = &input[..end];
            let body = body.strip_suffix(b"\r").unwrap_or(body);
            Ok((&input[end + 1..], body))
        }
        None => Err(nom::Err::Incomplete(Needed::Unknown)),
    }
}

/// The verb at the start of a control line, in any case.
fn verb(input: &[u8]) -> IResult<&[u8], Verb> {
    let (rest, word) = take_till1(|b| b == b' ' || b == b'\t').parse(input)?;
    match VERBS
        .iter()
        .find(|v| v.name().as_bytes().eq_ignore_ascii_case(word))
    {
        Some(v) => Ok((rest, *v)),
        None => Err(nom::Err::Error(nom::error::Error::new(
            input,
            nom::error::ErrorKind::Tag,
        ))),
    }
}

/// One whitespace-separated argument.
fn arg(input: &[u8]) -> IResult<&[u8], &[u8]> {
    preceded(space0, take_till1(|b| b == b' ' || b == b'\t')).parse(input)
}

/// The arguments after the verb, without allocating.
struct Args<'a> {
    items: [&'a [u8]; MAX_ARGS],
    len: usize,
}

impl<'a> Args<'a> {
    /// Splits `input`; `None` if there are more than [`MAX_ARGS`].
    fn split(mut input: &'a [u8]) -> Option<Args<'a>> {
        let mut args = Args {
            items: [&[]; MAX_ARGS],
            len: 0,
        };
        while let Ok((rest, item)) = arg(input) {
            if args.len == MAX_ARGS {
                return None;
            }
            args.items[args.len] = item;
            args.len += 1;
            input = rest;
        }
        Some(args)
    }

    fn as_slice(&self) -> &[&'a [u8]] {
        &self.items[..self.len]
    }
}

/// Parses a decimal size as nats-server does: digits only, no sign, no
/// overflow.
pub(crate) fn parse_size(digits: &[u8]) -> Option<usize> {
    if digits.is_empty() || digits.len() > 12 {
        return None;
    }
    digits.iter().try_fold(0usize, |acc, &b| {
        b.is_ascii_digit().then(|| acc * 10 + usize::from(b - b'0'))
    })
}

/// The end of a payload: `\r\n`, or a bare `\n` for telnet-like peers.
fn payload_end(input: &[u8]) -> Result<Option<usize>, ProtocolError> {
    match input {
        [] | [b'\r'] => Ok(None),
        [b'\r', b'\n', ..] => Ok(Some(2)),
        [b'\n', ..] => Ok(Some(1)),
        _ => Err(ProtocolError::UnknownOperation),
    }
}

/// Where the pieces of one parsed op lie in the input. Ranges, not slices, so
/// the caller can cut them from a frozen buffer after the borrow ends.
struct Frame {
    verb: Verb,
    args: [Range<usize>; MAX_ARGS],
    nargs: usize,
    /// The whole argument text (CONNECT/INFO JSON, -ERR text).
    rest: Range<usize>,
    /// The payload of PUB/HPUB/MSG/HMSG.
    payload: Range<usize>,
    header_len: Option<usize>,
    /// Bytes the op occupies, line end and payload end included.
    len: usize,
}

fn offset(base: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - base.as_ptr() as usize;
    start..start + part.len()
}

/// Finds the sizes of a message op: `(header_len, total_len)` from the
/// trailing size arguments.
fn sizes(verb: Verb, args: &[&[u8]]) -> Result<(Option<usize>, usize), ProtocolError> {
    let bad = ProtocolError::InvalidArguments(verb.name());
    let size = |b: &[u8]| parse_size(b).ok_or(bad.clone());
    match verb {
        Verb::Pub | Verb::Msg => Ok((None, size(args[args.len() - 1])?)),
        _ => {
            let hdr = size(args[args.len() - 2])?;
            let total = size(args[args.len() - 1])?;
            if hdr > total {
                return Err(bad);
            }
            Ok((Some(hdr), total))
        }
    }
}

/// Frames one op at the start of `input`. `Ok(None)` means more bytes are
/// needed; nothing about the input is remembered between calls.
/// `allowed` is checked as soon as the verb is known, so an op the peer may
/// not send is refused before its payload is waited for.
fn frame(
    input: &[u8],
    limits: &Limits,
    allowed: fn(Verb) -> bool,
) -> Result<Option<Frame>, ProtocolError> {
    let (after_line, body) = match line(input) {
        Ok(done) => done,
        // A trailing `\r` may be the start of the line end: it does not
        // count, as it would not once the `\n` arrives.
        Err(_) if input.strip_suffix(b"\r").unwrap_or(input).len() > limits.max_control_line => {
            return Err(ProtocolError::MaxControlLine)
        }
        Err(_) => return Ok(None),
    };
    if body.len() > limits.max_control_line {
        return Err(ProtocolError::MaxControlLine);
    }
    let (rest, verb) = verb(body).map_err(|_| ProtocolError::UnknownOperation)?;
    if !allowed(verb) {
        return Err(ProtocolError::UnknownOperation);
    }
    let (rest, _) = space0::<_, ()>(rest).map_err(|_| ProtocolError::UnknownOperation)?;
    // CONNECT, INFO and -ERR take free text (JSON may hold any number of
    // blanks), not arguments.
    let free_text = matches!(verb, Verb::Connect | Verb::Info | Verb::Err);
    let args = Args::split(if free_text { &[] } else { rest })
        .ok_or(ProtocolError::InvalidArguments(verb.name()))?;
    let argv = args.as_slice();
    let arity_ok = match verb {
        Verb::Connect | Verb::Info | Verb::Err => !rest.is_empty(),
        Verb::Ping | Verb::Pong | Verb::Ok => true,
        Verb::Pub => matches!(argv.len(), 2 | 3),
        Verb::HPub => matches!(argv.len(), 3 | 4),
        Verb::Sub => matches!(argv.len(), 2 | 3),
        Verb::Unsub => matches!(argv.len(), 1 | 2),
        Verb::Msg => matches!(argv.len(), 3 | 4),
        Verb::HMsg => matches!(argv.len(), 4 | 5),
    };
    if !arity_ok {
        return Err(ProtocolError::InvalidArguments(verb.name()));
    }
    let line_len = input.len() - after_line.len();
    let mut frame = Frame {
        verb,
        args: Default::default(),
        nargs: argv.len(),
        rest: offset(input, rest),
        payload: line_len..line_len,
        header_len: None,
        len: line_len,
    };
    for (slot, a) in frame.args.iter_mut().zip(argv) {
        *slot = offset(input, a);
    }
    if matches!(verb, Verb::Pub | Verb::HPub | Verb::Msg | Verb::HMsg) {
        let (header_len, total) = sizes(verb, argv)?;
        let Some(body_len) = payload_len(after_line, total, limits)? else {
            return Ok(None);
        };
        frame.header_len = header_len;
        frame.payload = line_len..line_len + total;
        frame.len = line_len + body_len;
    }
    Ok(Some(frame))
}

/// How many bytes after a control line a payload of `total` bytes occupies
/// with its line end, once all of them have arrived (`Ok(None)` before).
/// Over `max_payload` is refused before anything is waited for.
pub(crate) fn payload_len(
    after_line: &[u8],
    total: usize,
    limits: &Limits,
) -> Result<Option<usize>, ProtocolError> {
    if total > limits.max_payload {
        return Err(ProtocolError::MaxPayload);
    }
    let Some(tail) = after_line.get(total..) else {
        return Ok(None);
    };
    Ok(payload_end(tail)?.map(|end| total + end))
}

/// Cuts a parsed frame out of the buffer, zero-copy.
struct Cut {
    chunk: Bytes,
    frame: Frame,
}

impl Cut {
    fn arg(&self, i: usize) -> Bytes {
        self.chunk.slice(self.frame.args[i].clone())
    }

    fn rest(&self) -> Bytes {
        self.chunk.slice(self.frame.rest.clone())
    }

    fn nargs(&self) -> usize {
        self.frame.nargs
    }

    /// The size arguments come last: with headers there are two of them.
    fn size_args(&self) -> usize {
        if self.frame.header_len.is_some() {
            2
        } else {
            1
        }
    }

    fn message(self, subject: usize, reply: Option<usize>) -> Message {
        let reply = reply.map(|i| self.frame.args[i].clone());
        Message::from_parts(
            self.chunk,
            self.frame.args[subject].clone(),
            reply,
            self.frame.header_len,
            self.frame.payload,
        )
    }
}

fn next_frame(
    buf: &mut BytesMut,
    limits: &Limits,
    allowed: fn(Verb) -> bool,
) -> Result<Option<Cut>, ProtocolError> {
    let Some(frame) = frame(buf, limits, allowed)? else {
        return Ok(None);
    };
    let chunk = buf.split_to(frame.len).freeze();
    Ok(Some(Cut { chunk, frame }))
}

/// Parses the next client op from the front of `buf`, removing its bytes.
/// `Ok(None)`: the op is not complete yet and `buf` is untouched.
pub fn parse_client_op(
    buf: &mut BytesMut,
    limits: &Limits,
) -> Result<Option<ClientOp>, ProtocolError> {
    let Some(cut) = next_frame(buf, limits, Verb::sent_by_client)? else {
        return Ok(None);
    };
    let n = cut.nargs();
    let op = match cut.frame.verb {
        Verb::Connect => ClientOp::Connect(cut.rest()),
        Verb::Pub | Verb::HPub => {
            let with_reply = n - cut.size_args() == 2;
            ClientOp::Pub(cut.message(0, with_reply.then_some(1)))
        }
        Verb::Sub => ClientOp::Sub {
            subject: cut.arg(0),
            queue: (n == 3).then(|| cut.arg(1)),
            sid: cut.arg(n - 1),
        },
        Verb::Unsub => {
            let max = match n {
                2 => Some(
                    parse_size(&cut.arg(1)).ok_or(ProtocolError::InvalidArguments("UNSUB"))? as u64,
                ),
                _ => None,
            };
            ClientOp::Unsub {
                sid: cut.arg(0),
                max,
            }
        }
        Verb::Ping => ClientOp::Ping,
        Verb::Pong => ClientOp::Pong,
        _ => return Err(ProtocolError::UnknownOperation),
    };
    Ok(Some(op))
}

/// Parses the next server op from the front of `buf` (the client side of the
/// protocol, used by Skiff's own tools). Same contract as [`parse_client_op`].
pub fn parse_server_op(
    buf: &mut BytesMut,
    limits: &Limits,
) -> Result<Option<ServerOp>, ProtocolError> {
    let Some(cut) = next_frame(buf, limits, Verb::sent_by_server)? else {
        return Ok(None);
    };
    let n = cut.nargs();
    let op = match cut.frame.verb {
        Verb::Info => ServerOp::Info(cut.rest()),
        Verb::Msg | Verb::HMsg => {
            let with_reply = n - cut.size_args() == 3;
            ServerOp::Msg {
                sid: cut.arg(1),
                message: cut.message(0, with_reply.then_some(2)),
            }
        }
        Verb::Ok => ServerOp::Ok,
        Verb::Err => ServerOp::Err(cut.rest()),
        Verb::Ping => ServerOp::Ping,
        Verb::Pong => ServerOp::Pong,
        _ => return Err(ProtocolError::UnknownOperation),
    };
    Ok(Some(op))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_ops(input: &[u8]) -> Result<Vec<ClientOp>, ProtocolError> {
        let mut buf = BytesMut::from(input);
        let mut ops = Vec::new();
        while let Some(op) = parse_client_op(&mut buf, &Limits::default())? {
            ops.push(op);
        }
        Ok(ops)
    }

    fn publish(subject: &str, reply: Option<&str>, body: &str) -> ClientOp {
        ClientOp::Pub(Message::new(
            subject.as_bytes(),
            reply.map(str::as_bytes),
            None,
            body.as_bytes(),
        ))
    }

    #[test]
    fn parses_pub_with_and_without_reply() {
        let ops = client_ops(b"PUB foo 5\r\nhello\r\nPUB foo bar 2\r\nhi\r\n").unwrap();
        assert_eq!(
            ops,
            vec![
                publish("foo", None, "hello"),
                publish("foo", Some("bar"), "hi")
            ]
        );
    }

    #[test]
    fn telnet_style_input_is_accepted() {
        let ops = client_ops(b"pub \t foo   5\nhello\nping\nSuB  a.b  q  1\n").unwrap();
        assert_eq!(ops[0], publish("foo", None, "hello"));
        assert_eq!(ops[1], ClientOp::Ping);
        assert_eq!(
            ops[2],
            ClientOp::Sub {
                subject: Bytes::from_static(b"a.b"),
                queue: Some(Bytes::from_static(b"q")),
                sid: Bytes::from_static(b"1"),
            }
        );
    }

    #[test]
    fn hpub_carries_header_length() {
        let ops = client_ops(b"HPUB foo r 12 14\r\nNATS/1.0\r\n\r\nhi\r\n").unwrap();
        let ClientOp::Pub(m) = &ops[0] else {
            panic!("not a pub: {ops:?}")
        };
        assert_eq!(m.header_len(), Some(12));
        assert_eq!(m.data(), b"hi");
        assert_eq!(m.reply(), Some(&b"r"[..]));
    }

    #[test]
    fn incomplete_input_consumes_nothing() {
        let mut buf = BytesMut::from(&b"PUB foo 5\r\nhel"[..]);
        assert_eq!(parse_client_op(&mut buf, &Limits::default()), Ok(None));
        assert_eq!(&buf[..], b"PUB foo 5\r\nhel");
    }

    #[test]
    fn errors_use_nats_words() {
        assert_eq!(
            client_ops(b"FOO bar\r\n"),
            Err(ProtocolError::UnknownOperation)
        );
        assert_eq!(
            client_ops(b"PUB foo 2000000\r\n"),
            Err(ProtocolError::MaxPayload)
        );
        assert_eq!(
            client_ops(b"PUB foo x\r\n"),
            Err(ProtocolError::InvalidArguments("PUB"))
        );
        assert_eq!(
            client_ops(b"PUB foo 2\r\nabc\r\n"),
            Err(ProtocolError::UnknownOperation)
        );
        assert_eq!(
            client_ops(&[b'x'; 5000]),
            Err(ProtocolError::MaxControlLine)
        );
        assert_eq!(
            client_ops(b"MSG a 1 0\r\n\r\n"),
            Err(ProtocolError::UnknownOperation)
        );
        // Refused at once, not after buffering the announced payload.
        assert_eq!(
            client_ops(b"MSG a 1 1000\r\n"),
            Err(ProtocolError::UnknownOperation)
        );
    }

    #[test]
    fn unsub_with_max() {
        assert_eq!(
            client_ops(b"UNSUB 7 3\r\n").unwrap(),
            vec![ClientOp::Unsub {
                sid: Bytes::from_static(b"7"),
                max: Some(3)
            }]
        );
    }

    #[test]
    fn server_ops_parse() {
        let mut buf = BytesMut::from(
            &b"INFO {\"a\":1}\r\nMSG foo 9 bar 2\r\nhi\r\nHMSG foo 1 12 12\r\nNATS/1.0\r\n\r\n\r\n+OK\r\n-ERR 'x y'\r\n"[..],
        );
        let mut ops = Vec::new();
        while let Some(op) = parse_server_op(&mut buf, &Limits::default()).unwrap() {
            ops.push(op);
        }
        assert_eq!(ops[0], ServerOp::Info(Bytes::from_static(b"{\"a\":1}")));
        let ServerOp::Msg { sid, message } = &ops[1] else {
            panic!("{ops:?}")
        };
        assert_eq!((&sid[..], message.reply()), (&b"9"[..], Some(&b"bar"[..])));
        assert!(
            matches!(&ops[2], ServerOp::Msg { message, .. } if message.header_len() == Some(12))
        );
        assert_eq!(ops[3], ServerOp::Ok);
        assert_eq!(ops[4], ServerOp::Err(Bytes::from_static(b"'x y'")));
    }
}
