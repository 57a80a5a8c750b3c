//! The checks behind the fuzz targets, in one place.
//!
//! Included with `#[path]` by the cargo-fuzz targets in `fuzz/fuzz_targets/`
//! and by the plain tests in `tests/` (`fuzz_corpus.rs` replays the committed
//! corpus through these same functions; the proptests reuse the stream and
//! sublist harnesses). It depends only on `skiff`, `bytes` and `serde_json`.
//!
//! Every check panics (via `assert!`) when the property does not hold.

#![allow(dead_code)]

use std::collections::BTreeMap;

use bytes::{BufMut, BytesMut};
use skiff::auth::{AuthError, Authenticator, AuthorizationConfig, Secret};
use skiff::cluster::{
    encode_interest, encode_msg_line, encode_no_interest, names_queue, parse_route_op, RouteOp,
};
use skiff::config::authorization::{PermissionsConfig, SubjectRulesConfig, UserConfig};
use skiff::protocol::{
    encode_connect, encode_msg_header, encode_pub_header, encode_sub, encode_unsub,
    parse_client_op, parse_server_op, ClientOp, ConnectOptions, Limits, Message, ProtocolError,
    ServerOp, CRLF, OK, PING, PONG,
};
use skiff::subject;
use skiff::sublist::Sublist;
use skiff::tls::PeerIdentity;

// ---------------------------------------------------------------------------
// Parsers
// ---------------------------------------------------------------------------

/// A parser entry point: `parse_client_op` or `parse_server_op`.
pub type ParseFn<Op> = fn(&mut BytesMut, &Limits) -> Result<Option<Op>, ProtocolError>;

/// How parsing a whole stream ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// No error; these bytes were left over (an incomplete op, or nothing).
    Leftover(Vec<u8>),
    /// The parser refused the stream.
    Error(ProtocolError),
}

/// Every op parsed from a stream, and how the stream ended.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome<Op> {
    pub ops: Vec<Op>,
    pub end: End,
}

/// Parses everything in `buf`, checking the buffer contract on every call:
/// `Ok(None)` leaves `buf` untouched, `Ok(Some(_))` consumes at least one byte
/// from the front. `Some(error)` when the parser failed.
fn drain<Op>(
    buf: &mut BytesMut,
    limits: &Limits,
    parse: ParseFn<Op>,
    ops: &mut Vec<Op>,
) -> Option<ProtocolError> {
    loop {
        let (ptr, len) = (buf.as_ptr(), buf.len());
        match parse(buf, limits) {
            Ok(Some(op)) => {
                assert!(buf.len() < len, "an op was parsed from zero bytes");
                // Consumed from the front: the rest is where it was.
                assert_eq!(buf.as_ptr(), ptr.wrapping_add(len - buf.len()));
                ops.push(op);
            }
            Ok(None) => {
                assert_eq!((buf.as_ptr(), buf.len()), (ptr, len), "Ok(None) consumed");
                return None;
            }
            Err(e) => return Some(e),
        }
    }
}

/// Parses `stream` given all at once.
pub fn parse_whole<Op>(stream: &[u8], limits: &Limits, parse: ParseFn<Op>) -> Outcome<Op> {
    let mut buf = BytesMut::from(stream);
    let mut ops = Vec::new();
    let end = match drain(&mut buf, limits, parse, &mut ops) {
        Some(e) => End::Error(e),
        None => {
            // Ok(None) must have left the bytes as they were, not just their
            // length: the tail of the stream is still there.
            assert_eq!(&buf[..], &stream[stream.len() - buf.len()..]);
            End::Leftover(buf.to_vec())
        }
    };
    Outcome { ops, end }
}

/// Parses `stream` fed in reads of the sizes in `chunks`, cycled (`0` is a
/// wake-up with no new bytes). Parsing is retried after every read, as a
/// connection's read loop does.
pub fn parse_chunked<Op>(
    stream: &[u8],
    chunks: &[usize],
    limits: &Limits,
    parse: ParseFn<Op>,
) -> Outcome<Op> {
    let one = [1];
    let chunks = if chunks.iter().all(|&c| c == 0) {
        &one[..]
    } else {
        chunks
    };
    let mut sizes = chunks.iter().cycle();
    let mut buf = BytesMut::new();
    let mut ops = Vec::new();
    let mut fed = 0;
    loop {
        if let Some(e) = drain(&mut buf, limits, parse, &mut ops) {
            return Outcome {
                ops,
                end: End::Error(e),
            };
        }
        if fed == stream.len() {
            return Outcome {
                ops,
                end: End::Leftover(buf.to_vec()),
            };
        }
        let n = (*sizes.next().unwrap()).min(stream.len() - fed);
        buf.extend_from_slice(&stream[fed..fed + n]);
        fed += n;
    }
}

/// Limits for re-parsing canonical encodings: nothing is too large.
const UNLIMITED: Limits = Limits {
    max_control_line: usize::MAX,
    max_payload: usize::MAX,
};

fn check_message(m: &Message, limits: &Limits) {
    assert!(m.payload().len() <= limits.max_payload);
    let header_len = m.header_len().unwrap_or(0);
    assert!(header_len <= m.payload().len());
    assert_eq!(m.headers().len() + m.data().len(), m.payload().len());
    assert_eq!(&m.payload_bytes()[..], m.payload());
    check_arg(m.subject());
    m.reply().map(check_arg);
}

/// Arguments never contain the separators they were split on.
fn check_arg(arg: &[u8]) {
    assert!(!arg.is_empty());
    assert!(!arg.iter().any(|b| matches!(b, b' ' | b'\t' | b'\n')));
}

/// `verb text CRLF`: CONNECT, INFO and -ERR carry free text, not arguments,
/// and no encoder writes them from raw bytes.
fn text_line(buf: &mut BytesMut, verb: &[u8], text: &[u8]) {
    buf.put_slice(verb);
    buf.put_u8(b' ');
    buf.put_slice(text);
    buf.put_slice(CRLF);
}

/// The canonical wire form of a client op, written with Skiff's encoders.
pub fn encode_client_op(op: &ClientOp, buf: &mut BytesMut) {
    match op {
        ClientOp::Connect(json) => text_line(buf, b"CONNECT", json),
        ClientOp::Pub(m) => {
            encode_pub_header(
                buf,
                m.subject(),
                m.reply(),
                m.header_len(),
                m.payload().len(),
            );
            buf.put_slice(m.payload());
            buf.put_slice(CRLF);
        }
        ClientOp::Sub {
            subject,
            queue,
            sid,
        } => encode_sub(buf, subject, queue.as_deref(), sid),
        ClientOp::Unsub { sid, max } => encode_unsub(buf, sid, *max),
        ClientOp::Ping => buf.put_slice(PING),
        ClientOp::Pong => buf.put_slice(PONG),
    }
}

/// The canonical wire form of a server op.
pub fn encode_server_op(op: &ServerOp, buf: &mut BytesMut) {
    match op {
        ServerOp::Info(json) => text_line(buf, b"INFO", json),
        ServerOp::Msg { sid, message: m } => {
            encode_msg_header(
                buf,
                m.subject(),
                sid,
                m.reply(),
                m.header_len(),
                m.payload().len(),
            );
            buf.put_slice(m.payload());
            buf.put_slice(CRLF);
        }
        ServerOp::Ok => buf.put_slice(OK),
        ServerOp::Err(text) => text_line(buf, b"-ERR", text),
        ServerOp::Ping => buf.put_slice(PING),
        ServerOp::Pong => buf.put_slice(PONG),
    }
}

/// The queue group names an `RMSG` carries, in order.
pub fn queue_names(queues: &[u8]) -> Vec<&[u8]> {
    queues
        .split(|&b| b == b' ' || b == b'\t')
        .filter(|name| !name.is_empty())
        .collect()
}

/// The canonical wire form of a route op, written with the cluster's
/// encoders (a message's control line, then its payload and CRLF, as a
/// route writes it).
pub fn encode_route_op(op: &RouteOp, buf: &mut BytesMut) {
    match op {
        RouteOp::Info(json) => text_line(buf, b"INFO", json),
        RouteOp::Connect(json) => text_line(buf, b"CONNECT", json),
        RouteOp::Interest { subject, queue } => encode_interest(
            buf,
            subject,
            queue.as_ref().map(|(name, weight)| (&name[..], *weight)),
        ),
        RouteOp::NoInterest { subject, queue } => {
            encode_no_interest(buf, subject, queue.as_deref())
        }
        RouteOp::Msg { message, queues } => {
            encode_msg_line(buf, message, &queue_names(queues));
            buf.put_slice(message.payload());
            buf.put_slice(CRLF);
        }
        RouteOp::Ping => buf.put_slice(PING),
        RouteOp::Pong => buf.put_slice(PONG),
        RouteOp::Ok => buf.put_slice(OK),
        RouteOp::Err(text) => text_line(buf, b"-ERR", text),
    }
}

/// `op` as its canonical encoding parses: the encoder separates queue names
/// by one space, whatever blanks the peer used.
fn canonical_route_op(op: &RouteOp) -> RouteOp {
    match op {
        RouteOp::Msg { message, queues } => RouteOp::Msg {
            message: message.clone(),
            queues: queue_names(queues).join(&b' ').into(),
        },
        other => other.clone(),
    }
}

/// Sanity of one parsed client op, and that its canonical encoding parses
/// back to the same op.
fn check_client_op(op: &ClientOp, limits: &Limits) {
    match op {
        ClientOp::Connect(json) => {
            assert!(!json.is_empty());
            assert!(!json.contains(&b'\n'));
            let _ = ConnectOptions::from_json(json);
        }
        ClientOp::Pub(m) => check_message(m, limits),
        ClientOp::Sub {
            subject,
            queue,
            sid,
        } => {
            check_arg(subject);
            queue.as_deref().map(check_arg);
            check_arg(sid);
        }
        ClientOp::Unsub { sid, max } => {
            check_arg(sid);
            assert!(max.is_none_or(|m| m < 1_000_000_000_000));
        }
        ClientOp::Ping | ClientOp::Pong => {}
    }
    let mut buf = BytesMut::new();
    encode_client_op(op, &mut buf);
    let wire = buf.to_vec();
    let again = parse_whole(&wire, &UNLIMITED, parse_client_op);
    assert_eq!(
        again,
        Outcome {
            ops: vec![op.clone()],
            end: End::Leftover(Vec::new())
        },
        "re-encoded as {:?}",
        String::from_utf8_lossy(&wire)
    );
}

fn check_server_op(op: &ServerOp, limits: &Limits) {
    match op {
        ServerOp::Info(json) | ServerOp::Err(json) => {
            assert!(!json.is_empty());
            assert!(!json.contains(&b'\n'));
        }
        ServerOp::Msg { sid, message } => {
            check_arg(sid);
            check_message(message, limits);
        }
        ServerOp::Ok | ServerOp::Ping | ServerOp::Pong => {}
    }
    let mut buf = BytesMut::new();
    encode_server_op(op, &mut buf);
    let wire = buf.to_vec();
    let again = parse_whole(&wire, &UNLIMITED, parse_server_op);
    assert_eq!(
        again,
        Outcome {
            ops: vec![op.clone()],
            end: End::Leftover(Vec::new())
        },
        "re-encoded as {:?}",
        String::from_utf8_lossy(&wire)
    );
}

/// Sanity of one parsed route op, and that the cluster's encoders write it
/// in a form that parses back to the same op.
fn check_route_op(op: &RouteOp, limits: &Limits) {
    match op {
        RouteOp::Info(text) | RouteOp::Connect(text) | RouteOp::Err(text) => {
            assert!(!text.is_empty());
            assert!(!text.contains(&b'\n'));
            assert!(!matches!(text[0], b' ' | b'\t'));
        }
        RouteOp::Interest { subject, queue } => {
            check_arg(subject);
            if let Some((name, _)) = queue {
                check_arg(name);
            }
        }
        RouteOp::NoInterest { subject, queue } => {
            check_arg(subject);
            queue.as_deref().map(check_arg);
        }
        RouteOp::Msg { message, queues } => {
            check_message(message, limits);
            // The names are trimmed of the blanks around them, and every one
            // is found by `names_queue`, which routing asks.
            assert!(!queues.starts_with(b" ") && !queues.starts_with(b"\t"));
            assert!(!queues.ends_with(b" ") && !queues.ends_with(b"\t"));
            for name in queue_names(queues) {
                check_arg(name);
                assert!(names_queue(queues, name));
            }
            assert!(!names_queue(queues, b""));
        }
        RouteOp::Ping | RouteOp::Pong | RouteOp::Ok => {}
    }
    let mut buf = BytesMut::new();
    encode_route_op(op, &mut buf);
    let wire = buf.to_vec();
    let again = parse_whole(&wire, &UNLIMITED, parse_route_op);
    assert_eq!(
        again,
        Outcome {
            ops: vec![canonical_route_op(op)],
            end: End::Leftover(Vec::new())
        },
        "re-encoded as {:?}",
        String::from_utf8_lossy(&wire)
    );
}

/// Parses `stream` whole and in `chunks`, asserts both give the same ops and
/// the same end, checks every op, and returns the outcome.
pub fn check_client_stream(stream: &[u8], chunks: &[usize], limits: &Limits) -> Outcome<ClientOp> {
    let whole = parse_whole(stream, limits, parse_client_op);
    let split = parse_chunked(stream, chunks, limits, parse_client_op);
    assert_eq!(whole, split, "split into reads of {chunks:?}");
    for op in &whole.ops {
        check_client_op(op, limits);
    }
    whole
}

/// [`check_client_stream`] for the server side of the protocol.
pub fn check_server_stream(stream: &[u8], chunks: &[usize], limits: &Limits) -> Outcome<ServerOp> {
    let whole = parse_whole(stream, limits, parse_server_op);
    let split = parse_chunked(stream, chunks, limits, parse_server_op);
    assert_eq!(whole, split, "split into reads of {chunks:?}");
    for op in &whole.ops {
        check_server_op(op, limits);
    }
    whole
}

/// [`check_client_stream`] for the route protocol between cluster nodes.
pub fn check_route_stream(stream: &[u8], chunks: &[usize], limits: &Limits) -> Outcome<RouteOp> {
    let whole = parse_whole(stream, limits, parse_route_op);
    let split = parse_chunked(stream, chunks, limits, parse_route_op);
    assert_eq!(whole, split, "split into reads of {chunks:?}");
    for op in &whole.ops {
        check_route_op(op, limits);
    }
    whole
}

/// How a fuzz input drives a parser check: a small header, then the stream.
///
/// ```text
/// byte 0      flags: bit 0 set = small limits (below), else the defaults
/// byte 1      max_control_line = byte (small limits only)
/// byte 2      max_payload = byte (small limits only)
/// byte 3      k = byte % 8: how many read sizes follow (0: one byte a read)
/// k bytes     read sizes, cycled (0 = a wake-up with no new bytes)
/// rest        the protocol stream
/// ```
///
/// Missing header bytes count as zero, so any input is a valid plan.
pub struct Plan<'a> {
    pub limits: Limits,
    pub chunks: Vec<usize>,
    pub stream: &'a [u8],
}

impl<'a> Plan<'a> {
    pub fn decode(data: &'a [u8]) -> Plan<'a> {
        let byte = |i: usize| data.get(i).copied().unwrap_or(0);
        let limits = if byte(0) & 1 == 1 {
            Limits {
                max_control_line: usize::from(byte(1)),
                max_payload: usize::from(byte(2)),
            }
        } else {
            Limits::default()
        };
        let k = usize::from(byte(3) % 8);
        let start = (4 + k).min(data.len());
        let chunks = data
            .get(4..start)
            .unwrap_or_default()
            .iter()
            .map(|&b| usize::from(b))
            .collect();
        Plan {
            limits,
            chunks,
            stream: &data[start..],
        }
    }

    /// The inverse of [`Plan::decode`], for writing seed inputs.
    pub fn encode(small: Option<(u8, u8)>, chunks: &[u8], stream: &[u8]) -> Vec<u8> {
        assert!(chunks.len() < 8);
        let (flag, line, payload) = match small {
            Some((line, payload)) => (1, line, payload),
            None => (0, 0, 0),
        };
        let mut out = vec![flag, line, payload, chunks.len() as u8];
        out.extend_from_slice(chunks);
        out.extend_from_slice(stream);
        out
    }
}

/// Fuzz target `client_parser`.
pub fn client_parser(data: &[u8]) {
    let plan = Plan::decode(data);
    check_client_stream(plan.stream, &plan.chunks, &plan.limits);
}

/// Fuzz target `server_parser`.
pub fn server_parser(data: &[u8]) {
    let plan = Plan::decode(data);
    check_server_stream(plan.stream, &plan.chunks, &plan.limits);
}

/// Fuzz target `route_parser`.
pub fn route_parser(data: &[u8]) {
    let plan = Plan::decode(data);
    check_route_stream(plan.stream, &plan.chunks, &plan.limits);
}

// ---------------------------------------------------------------------------
// CONNECT JSON
// ---------------------------------------------------------------------------

/// Fuzz target `connect_json`: decoding never panics, and what decodes
/// survives a trip through `encode_connect` and the parser unchanged.
pub fn connect_json(data: &[u8]) {
    let Ok(options) = ConnectOptions::from_json(data) else {
        return;
    };
    let json = serde_json::to_vec(&options).expect("ConnectOptions serialises");
    let mut buf = BytesMut::new();
    encode_connect(&mut buf, &options);
    let Ok(Some(ClientOp::Connect(sent))) = parse_client_op(&mut buf, &UNLIMITED) else {
        panic!("encode_connect wrote something the parser refuses");
    };
    assert!(buf.is_empty());
    assert_eq!(&sent[..], &json[..]);
    let again = ConnectOptions::from_json(&sent).expect("re-decodes");
    assert_eq!(serde_json::to_vec(&again).unwrap(), json);
}

// ---------------------------------------------------------------------------
// CONNECT authentication
// ---------------------------------------------------------------------------

/// The nkey user of [`fixed_authenticator`] (its seed signs the seed corpus:
/// `SUAB7RWLFBDMCTU2DH7BA7IKJ6JFFU5Q6XXNKGCZSJ4M7WE5URNDXDB75M`).
pub const FUZZ_NKEY: &str = "UAJQ3QSMEM7J462Y75V75IBHCLXVH4V4GNUGGP4QUA4ZEZDJMPGYIJZ6";
/// The nonce the connect_auth target's connections were sent.
pub const FUZZ_NONCE: &str = "fuzz-nonce";
/// Plain, bcrypt (of `bcrypt-pw`, cost 4) and certificate-only users.
const FUZZ_PLAIN: (&str, &str) = ("plain", "plain-pw");
const FUZZ_BCRYPT: (&str, &str) = (
    "hashed",
    "$2b$04$2YXUsdAkrl.bxa/gOPVF2O.KVI2jyphHyOO/x9dTgVbGqXktkKRZO",
);
const FUZZ_CERT_USER: &str = "CN=device";

/// An authenticator with one user of each kind, made once.
pub fn fixed_authenticator() -> &'static Authenticator {
    static AUTH: std::sync::OnceLock<Authenticator> = std::sync::OnceLock::new();
    AUTH.get_or_init(|| {
        let limited = PermissionsConfig {
            publish: Some(SubjectRulesConfig::List(vec!["a.>".into()])),
            ..PermissionsConfig::default()
        };
        let user = |name: &str, password: Option<&str>| UserConfig {
            user: Some(name.into()),
            password: password.map(|p| Secret(p.into())),
            permissions: Some(limited.clone()),
            ..UserConfig::default()
        };
        let config = AuthorizationConfig {
            users: vec![
                user(FUZZ_PLAIN.0, Some(FUZZ_PLAIN.1)),
                user(FUZZ_BCRYPT.0, Some(FUZZ_BCRYPT.1)),
                user(FUZZ_CERT_USER, None),
                UserConfig {
                    nkey: Some(FUZZ_NKEY.into()),
                    ..UserConfig::default()
                },
            ],
            ..AuthorizationConfig::default()
        };
        config
            .validate()
            .expect("the fuzz authorization config is valid");
        Authenticator::new(&config)
    })
}

/// Fuzz target `connect_auth`: byte 0 chooses the nonce (bit 0: none) and
/// whether a certificate identity comes with the connection (bit 1, its
/// subject the next line of input); the rest is the CONNECT JSON. Judging
/// never panics; whoever is accepted is one of the configured users and
/// proved it; the redacted CONNECT shows no secret.
pub fn connect_auth(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (cert, json) = if flags & 2 == 2 {
        let (line, json) = match rest.iter().position(|&b| b == b'\n') {
            Some(at) => (&rest[..at], &rest[at + 1..]),
            None => (rest, &[][..]),
        };
        let subject = String::from_utf8_lossy(line).into_owned();
        (
            Some(PeerIdentity {
                subject,
                sans: Vec::new(),
            }),
            json,
        )
    } else {
        (None, rest)
    };
    let nonce = (flags & 1 == 0).then_some(FUZZ_NONCE);
    let Ok(connect) = ConnectOptions::from_json(json) else {
        return;
    };
    let shown = connect.redacted();
    for secret in [&shown.pass, &shown.auth_token, &shown.sig, &shown.jwt] {
        assert!(secret.as_deref().is_none_or(|s| s == "[REDACTED]"));
    }
    assert_eq!(shown.user, connect.user);
    let auth = fixed_authenticator();
    match auth.authenticate(&connect, nonce, cert.as_ref()) {
        Ok(accepted) => {
            let user = accepted.user.as_str();
            match &cert {
                Some(c) => assert_eq!((user, c.subject.as_str()), (FUZZ_CERT_USER, FUZZ_CERT_USER)),
                None if user == FUZZ_NKEY => {
                    assert_eq!(connect.nkey.as_deref(), Some(FUZZ_NKEY));
                    assert!(nonce.is_some() && connect.sig.is_some());
                }
                None => {
                    assert_eq!(connect.user.as_deref(), Some(user));
                    let expected = if user == FUZZ_PLAIN.0 {
                        FUZZ_PLAIN.1
                    } else {
                        "bcrypt-pw"
                    };
                    assert_eq!(connect.pass.as_deref(), Some(expected));
                }
            }
            if let Some(p) = accepted.permissions {
                assert!(p.can_publish(b"a.b"));
                assert!(!p.can_publish(b"b"));
            }
        }
        Err(AuthError::NoCredentials) => {
            assert!(cert.is_none() && connect.nkey.is_none() && connect.user.is_none());
        }
        Err(_) => {}
    }
}

// ---------------------------------------------------------------------------
// Sublist
// ---------------------------------------------------------------------------

/// A sublist next to the naive reference: every live subscription in a list,
/// matched with [`subject::matches_pattern`].
#[derive(Default)]
pub struct SublistModel {
    pub list: Sublist<u32>,
    pub live: Vec<(Vec<u8>, Option<Vec<u8>>, u32)>,
}

/// What matched, order-free: plain items and each queue group's members,
/// sorted.
#[derive(Debug, PartialEq, Eq)]
pub struct MatchSet {
    pub plain: Vec<u32>,
    pub queues: BTreeMap<Vec<u8>, Vec<u32>>,
}

impl SublistModel {
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts into both; the sublist must refuse exactly the invalid
    /// patterns.
    pub fn insert(&mut self, pattern: &[u8], queue: Option<&[u8]>, item: u32) {
        let valid = subject::is_valid_subject(pattern);
        let result = self.list.insert(pattern, queue, item);
        assert_eq!(
            result.is_ok(),
            valid,
            "insert {:?}",
            String::from_utf8_lossy(pattern)
        );
        if valid {
            self.live
                .push((pattern.to_vec(), queue.map(<[u8]>::to_vec), item));
        }
        assert_eq!(self.list.count(), self.live.len());
    }

    /// Removes from both; the sublist must report removal exactly when the
    /// reference held the subscription.
    pub fn remove(&mut self, pattern: &[u8], queue: Option<&[u8]>, item: u32) {
        let at = self
            .live
            .iter()
            .position(|(p, q, i)| p == pattern && q.as_deref() == queue && *i == item);
        let removed = self.list.remove(pattern, queue, &item);
        assert_eq!(
            removed,
            at.is_some(),
            "remove {:?} {:?} {item}",
            String::from_utf8_lossy(pattern),
            queue.map(String::from_utf8_lossy)
        );
        if let Some(at) = at {
            self.live.swap_remove(at);
        }
        assert_eq!(self.list.count(), self.live.len());
    }

    /// Removes the `n`th live subscription (modulo), if any.
    pub fn remove_live(&mut self, n: usize) {
        if self.live.is_empty() {
            return;
        }
        let (p, q, i) = self.live[n % self.live.len()].clone();
        self.remove(&p, q.as_deref(), i);
    }

    /// The naive answer for `subject`.
    pub fn expected(&self, subject: &[u8]) -> MatchSet {
        let mut set = MatchSet {
            plain: Vec::new(),
            queues: BTreeMap::new(),
        };
        for (pattern, queue, item) in &self.live {
            if !subject::matches_pattern(pattern, subject) {
                continue;
            }
            match queue {
                None => set.plain.push(*item),
                Some(q) => set.queues.entry(q.clone()).or_default().push(*item),
            }
        }
        set.plain.sort_unstable();
        set.queues.values_mut().for_each(|m| m.sort_unstable());
        set
    }

    /// The sublist's answer for `subject`.
    pub fn actual(&self, subject: &[u8]) -> MatchSet {
        let found = self.list.matches(subject);
        let mut plain = found.plain.clone();
        plain.sort_unstable();
        let mut queues = BTreeMap::new();
        for group in &found.queues {
            assert!(!group.members.is_empty(), "empty queue group");
            let mut members = group.members.clone();
            members.sort_unstable();
            let dup = queues.insert(group.name.to_vec(), members);
            assert!(dup.is_none(), "queue group listed twice");
            // Round-robin picks a member; never panics on a non-empty group.
            assert!(group.members.contains(group.pick()));
        }
        assert_eq!(found.is_empty(), plain.is_empty() && queues.is_empty());
        MatchSet { plain, queues }
    }

    /// Asserts the sublist agrees with the reference for `subject`.
    pub fn check(&self, subject: &[u8]) {
        assert_eq!(
            self.actual(subject),
            self.expected(subject),
            "matching {:?}",
            String::from_utf8_lossy(subject)
        );
    }
}

/// Literal tokens subjects are made of: few, so that patterns match often.
pub const LITERALS: [&[u8]; 4] = [b"a", b"b", b"c", b"ab"];
/// Pattern tokens: the literals, the wildcards, and two invalid tokens (empty,
/// whitespace) so that refusal is exercised too.
pub const PATTERN_TOKENS: [&[u8]; 8] = [b"a", b"b", b"c", b"ab", b"*", b">", b"", b"a b"];
/// Queue group names.
pub const QUEUES: [&[u8]; 3] = [b"q1", b"q2", b"q3"];

/// Reads fuzz input bytes one at a time; zeros after the end.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    /// `b`: 1 to 4 tokens (low bits), each a byte choosing from `alphabet`;
    /// the invalid tokens (the last two of `PATTERN_TOKENS`) are rare.
    fn subject(&mut self, alphabet: &[&[u8]]) -> Vec<u8> {
        let n = 1 + usize::from(self.byte() % 4);
        let mut out = Vec::new();
        for i in 0..n {
            if i > 0 {
                out.push(b'.');
            }
            let b = usize::from(self.byte());
            let token = if alphabet.len() > 6 && b % 32 >= 30 {
                alphabet[6 + b % 2]
            } else {
                alphabet[b % alphabet.len().min(6)]
            };
            out.extend_from_slice(token);
        }
        out
    }

    fn queue(&mut self) -> Option<&'static [u8]> {
        match self.byte() % 4 {
            0 => None,
            n => Some(QUEUES[usize::from(n) - 1]),
        }
    }
}

/// Fuzz target `sublist`: the input is a program of inserts, removes and
/// matches, each checked against the naive reference.
///
/// ```text
/// op byte % 8:  0-2 insert  pattern queue item
///               3   remove a live subscription  (index byte)
///               4   remove  pattern queue item  (usually absent)
///               5-7 match   subject
/// ```
pub fn sublist(data: &[u8]) {
    let mut model = SublistModel::new();
    let mut input = Reader(data);
    while !input.0.is_empty() {
        match input.byte() % 8 {
            0..=2 => {
                let pattern = input.subject(&PATTERN_TOKENS);
                let queue = input.queue();
                let item = u32::from(input.byte() % 16);
                model.insert(&pattern, queue, item);
            }
            3 => {
                let n = usize::from(input.byte());
                model.remove_live(n);
            }
            4 => {
                let pattern = input.subject(&PATTERN_TOKENS);
                let queue = input.queue();
                let item = u32::from(input.byte() % 16);
                model.remove(&pattern, queue, item);
            }
            _ => {
                let subject = input.subject(&LITERALS);
                model.check(&subject);
            }
        }
    }
    // Finally every subject of up to three tokens.
    for_each_subject(3, |s| model.check(s));
}

/// Calls `f` with every literal subject of 1 to `max_tokens` tokens from
/// [`LITERALS`].
pub fn for_each_subject(max_tokens: usize, mut f: impl FnMut(&[u8])) {
    fn walk(prefix: &mut Vec<u8>, left: usize, f: &mut dyn FnMut(&[u8])) {
        for token in LITERALS {
            let len = prefix.len();
            if len > 0 {
                prefix.push(b'.');
            }
            prefix.extend_from_slice(token);
            f(prefix);
            if left > 1 {
                walk(prefix, left - 1, f);
            }
            prefix.truncate(len);
        }
    }
    walk(&mut Vec::new(), max_tokens, &mut f);
}
