//! Property tests of the cluster's route protocol parser.
//!
//! Streams of valid route ops are generated together with the ops they must
//! parse to: `RS+` with and without a queue and weight, `RS-`, `RMSG` and
//! `HMSG` in every reply/queue form (none, a reply, `+ reply queues...`,
//! `| queues...`), payloads full of `\r` and `\n`, `PING`, `PONG`, `+OK`,
//! `INFO` and `CONNECT` JSON and `-ERR` text. Each op is written one of two
//! ways:
//!
//! - by the cluster's own encoders (`encode_interest`, `encode_no_interest`,
//!   `encode_msg_line` + payload + CRLF, `encode_route_info`), so that what a
//!   node sends is pinned to parse back to exactly what it meant;
//! - by hand, in the looser forms the parser accepts from a peer: verbs in
//!   any case, runs of spaces and tabs between words, trailing blanks, `\n`
//!   or `\r\n` after the control line and after the payload, leading zeros
//!   in numbers.
//!
//! The parser must give exactly those ops whether fed the stream whole, in
//! random reads or one byte at a time; a cut stream must wait, not fail;
//! arbitrary bytes must never panic; `Ok(None)` must never consume anything.
//! The stream checks themselves (and the canonical encoding of a parsed op)
//! live in `fuzz/common/checks.rs`, shared with the `route_parser` fuzz target
//! and the corpus replay.

#[path = "../fuzz/common/checks.rs"]
mod checks;

use bytes::{Bytes, BytesMut};
use checks::{check_route_stream, encode_route_op, parse_chunked, End, Outcome};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use skiff::cluster::{encode_route_info, parse_route_op, RouteInfo, RouteOp};
use skiff::protocol::{Limits, Message};

/// How a hand-written op is laid out.
#[derive(Clone, Debug)]
struct Style {
    /// Bit `i` set: letter `i` of the verb in lower case.
    lowercase: u8,
    /// The blanks before each word, cycled (an `RMSG` may have many words).
    seps: Vec<Vec<u8>>,
    trailing: Vec<u8>,
    crlf: bool,
    payload_crlf: bool,
    zeros: usize,
}

fn blanks() -> impl Strategy<Value = Vec<u8>> {
    vec(prop_oneof![3 => Just(b' '), 1 => Just(b'\t')], 1..4)
}

fn style() -> impl Strategy<Value = Style> {
    (
        any::<u8>(),
        vec(blanks(), 1..8),
        prop_oneof![3 => Just(Vec::new()), 1 => blanks()],
        any::<bool>(),
        any::<bool>(),
        prop_oneof![4 => Just(0usize), 1 => 1usize..3],
    )
        .prop_map(
            |(lowercase, seps, trailing, crlf, payload_crlf, zeros)| Style {
                lowercase,
                seps,
                trailing,
                crlf,
                payload_crlf,
                zeros,
            },
        )
}

/// A control line being written in a [`Style`].
struct Line<'a> {
    style: &'a Style,
    out: Vec<u8>,
    words: usize,
}

impl<'a> Line<'a> {
    fn new(style: &'a Style, verb: &str) -> Line<'a> {
        let out = verb
            .bytes()
            .enumerate()
            .map(|(i, b)| {
                if style.lowercase >> (i % 8) & 1 == 1 {
                    b.to_ascii_lowercase()
                } else {
                    b
                }
            })
            .collect();
        Line {
            style,
            out,
            words: 0,
        }
    }

    /// Appends blanks and `word`; returns where the word lies in the line.
    fn word(&mut self, word: &[u8]) -> std::ops::Range<usize> {
        let seps = &self.style.seps;
        self.out.extend_from_slice(&seps[self.words % seps.len()]);
        self.words += 1;
        let start = self.out.len();
        self.out.extend_from_slice(word);
        start..self.out.len()
    }

    /// A decimal number, maybe with leading zeros.
    fn num(&mut self, n: usize) {
        let mut digits = vec![b'0'; self.style.zeros];
        digits.extend_from_slice(n.to_string().as_bytes());
        self.word(&digits);
    }

    /// The line end, after trailing blanks where they are not part of free
    /// text (after INFO, CONNECT and -ERR they would be).
    fn end(mut self, trailing: bool) -> Vec<u8> {
        if trailing {
            self.out.extend_from_slice(&self.style.trailing);
        }
        self.out
            .extend_from_slice(if self.style.crlf { b"\r\n" } else { b"\n" });
        self.out
    }
}

/// Subjects and queue names: anything without blanks or line ends, mostly
/// from a small alphabet (so `+` and `|` come up as names too).
fn word() -> impl Strategy<Value = Vec<u8>> {
    vec(
        prop_oneof![
            8 => b'a'..=b'd',
            2 => Just(b'.'),
            1 => Just(b'*'),
            1 => Just(b'>'),
            1 => 0x21u8..=0x7e,
            1 => 0x80u8..=0xff,
        ],
        1..10,
    )
}

/// Reply subjects, now and then exactly the `+` and `|` markers of the queue
/// forms, which a reply may still be.
fn reply() -> impl Strategy<Value = Option<Vec<u8>>> {
    option::of(prop_oneof![
        8 => word(),
        1 => Just(b"+".to_vec()),
        1 => Just(b"|".to_vec()),
    ])
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    vec(
        prop_oneof![4 => any::<u8>(), 1 => Just(b'\r'), 1 => Just(b'\n')],
        0..48,
    )
}

fn headers() -> impl Strategy<Value = Option<Vec<u8>>> {
    option::of(prop_oneof![
        Just(b"NATS/1.0\r\n\r\n".to_vec()),
        "[a-z]{1,5}".prop_map(|v| format!("NATS/1.0\r\nX-K: {v}\r\n\r\n").into_bytes()),
        payload(),
    ])
}

/// Text after INFO / CONNECT: real JSON (compact, or with blanks as other
/// JSON writers put them) or any printable run not starting with a blank.
fn json() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (any::<bool>(), "[a-z ]{0,8}").prop_map(|(auth, name)| {
            format!(r#"{{"server_id":"N1","server_name":"{name}","auth_required":{auth}}}"#)
                .into_bytes()
        }),
        (any::<bool>(), "[a-z ]{0,8}").prop_map(|(auth, name)| {
            format!(r#"{{"server_id": "N1", "cluster": "{name}", "auth_required": {auth}}}"#)
                .into_bytes()
        }),
        "[!-~][ -~]{0,30}".prop_map(String::into_bytes),
    ]
}

/// `None`: written by the cluster's encoders; `Some`: by hand in that style.
fn render() -> impl Strategy<Value = Option<Style>> {
    prop_oneof![1 => Just(None), 2 => style().prop_map(Some)]
}

/// `op` as a node writes it, with the cluster's encoders.
fn canonical(op: &RouteOp) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode_route_op(op, &mut buf);
    buf.to_vec()
}

/// The wire form of `op`: canonical, or hand-written by `hand`.
fn wire(op: &RouteOp, style: &Option<Style>, hand: impl FnOnce(&Style) -> Vec<u8>) -> Vec<u8> {
    match style {
        Some(style) => hand(style),
        None => canonical(op),
    }
}

fn interest() -> impl Strategy<Value = (Vec<u8>, RouteOp)> {
    (word(), option::of((word(), any::<u32>())), render()).prop_map(|(subject, queue, render)| {
        let op = RouteOp::Interest {
            subject: Bytes::from(subject.clone()),
            queue: queue
                .clone()
                .map(|(name, weight)| (Bytes::from(name), weight)),
        };
        let wire = wire(&op, &render, |style| {
            let mut line = Line::new(style, "RS+");
            line.word(b"$G");
            line.word(&subject);
            if let Some((name, weight)) = &queue {
                line.word(name);
                line.num(*weight as usize);
            }
            line.end(true)
        });
        (wire, op)
    })
}

fn no_interest() -> impl Strategy<Value = (Vec<u8>, RouteOp)> {
    (word(), option::of(word()), render()).prop_map(|(subject, queue, render)| {
        let op = RouteOp::NoInterest {
            subject: Bytes::from(subject.clone()),
            queue: queue.clone().map(Bytes::from),
        };
        let wire = wire(&op, &render, |style| {
            let mut line = Line::new(style, "RS-");
            line.word(b"$G");
            line.word(&subject);
            if let Some(name) = &queue {
                line.word(name);
            }
            line.end(true)
        });
        (wire, op)
    })
}

/// `RMSG`/`HMSG` in every reply/queue form. By hand, a reply without queues
/// is sometimes written in the `+ reply` form, which the parser also takes.
fn message() -> impl Strategy<Value = (Vec<u8>, RouteOp)> {
    (
        word(),
        reply(),
        vec(word(), 0..4),
        headers(),
        payload(),
        any::<bool>(),
        render(),
    )
        .prop_map(
            |(subject, reply, queues, headers, body, plus_form, render)| {
                let header_len = headers.as_ref().map(Vec::len);
                let payload = [headers.unwrap_or_default(), body].concat();
                let message = Message::new(&subject, reply.as_deref(), header_len, &payload);
                let verb = if header_len.is_some() { "HMSG" } else { "RMSG" };
                let Some(style) = render else {
                    let op = RouteOp::Msg {
                        message,
                        queues: queues.join(&b' ').into(),
                    };
                    return (canonical(&op), op);
                };
                let mut line = Line::new(&style, verb);
                line.word(b"$G");
                line.word(&subject);
                match (&reply, queues.is_empty()) {
                    (Some(reply), false) => {
                        line.word(b"+");
                        line.word(reply);
                    }
                    (Some(reply), true) if plus_form => {
                        line.word(b"+");
                        line.word(reply);
                    }
                    (Some(reply), true) => {
                        line.word(reply);
                    }
                    (None, false) => {
                        line.word(b"|");
                    }
                    (None, true) => {}
                }
                // The queue names come out as the peer wrote them, blanks between
                // them included: one slice of the line, not a list.
                let spans: Vec<_> = queues.iter().map(|name| line.word(name)).collect();
                let names = match (spans.first(), spans.last()) {
                    (Some(first), Some(last)) => line.out[first.start..last.end].to_vec(),
                    _ => Vec::new(),
                };
                if let Some(h) = header_len {
                    line.num(h);
                }
                line.num(payload.len());
                let mut wire = line.end(true);
                wire.extend_from_slice(&payload);
                wire.extend_from_slice(if style.payload_crlf { b"\r\n" } else { b"\n" });
                let op = RouteOp::Msg {
                    message,
                    queues: names.into(),
                };
                (wire, op)
            },
        )
}

/// INFO, CONNECT and -ERR: free text, blanks and all.
fn text_op() -> impl Strategy<Value = (Vec<u8>, RouteOp)> {
    let err_text = "'[A-Za-z \"]{0,40}'".prop_map(String::into_bytes);
    (
        prop_oneof![
            json().prop_map(|t| ("INFO", t)),
            json().prop_map(|t| ("CONNECT", t)),
            err_text.prop_map(|t| ("-ERR", t)),
        ],
        render(),
    )
        .prop_map(|((verb, text), render)| {
            let bytes = Bytes::from(text.clone());
            let op = match verb {
                "INFO" => RouteOp::Info(bytes),
                "CONNECT" => RouteOp::Connect(bytes),
                _ => RouteOp::Err(bytes),
            };
            let wire = wire(&op, &render, |style| {
                let mut line = Line::new(style, verb);
                line.word(&text);
                line.end(false)
            });
            (wire, op)
        })
}

fn control_op() -> impl Strategy<Value = (Vec<u8>, RouteOp)> {
    (
        prop_oneof![
            Just(("PING", RouteOp::Ping)),
            Just(("PONG", RouteOp::Pong)),
            Just(("+OK", RouteOp::Ok)),
        ],
        render(),
    )
        .prop_map(|((verb, op), render)| {
            let wire = wire(&op, &render, |style| Line::new(style, verb).end(true));
            (wire, op)
        })
}

/// One route op: its wire form and the op it must parse to.
fn route_op() -> impl Strategy<Value = (Vec<u8>, RouteOp)> {
    prop_oneof![
        2 => interest(),
        1 => no_interest(),
        4 => message(),
        1 => text_op(),
        1 => control_op(),
    ]
}

fn stream(ops: Vec<(Vec<u8>, RouteOp)>) -> (Vec<u8>, Vec<RouteOp>) {
    let (wires, ops): (Vec<Vec<u8>>, Vec<RouteOp>) = ops.into_iter().unzip();
    (wires.concat(), ops)
}

/// Byte soup made of route protocol fragments, so that the parser gets past
/// the verb and into the argument forms more often than with uniform bytes.
fn noise() -> impl Strategy<Value = Vec<u8>> {
    let fragment = prop_oneof![
        Just(b"RS+ ".to_vec()),
        Just(b"rs- ".to_vec()),
        Just(b"RMSG ".to_vec()),
        Just(b"hmsg ".to_vec()),
        Just(b"$G ".to_vec()),
        Just(b"+ ".to_vec()),
        Just(b"| ".to_vec()),
        Just(b"q1 ".to_vec()),
        Just(b"CONNECT ".to_vec()),
        Just(b"INFO ".to_vec()),
        Just(b"-ERR ".to_vec()),
        Just(b"+OK".to_vec()),
        Just(b"PING".to_vec()),
        Just(b"pong".to_vec()),
        Just(b"foo.bar ".to_vec()),
        Just(b" ".to_vec()),
        Just(b"\t".to_vec()),
        Just(b"\r".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\r\n".to_vec()),
        (0usize..40).prop_map(|n| n.to_string().into_bytes()),
        vec(any::<u8>(), 1..6),
    ];
    vec(fragment, 0..40).prop_map(|parts| parts.concat())
}

fn chunks() -> impl Strategy<Value = Vec<usize>> {
    vec(prop_oneof![1 => Just(0usize), 8 => 1usize..24], 1..6)
}

fn route_info() -> impl Strategy<Value = RouteInfo> {
    (
        "[A-Z0-9]{1,12}",
        "\\PC{0,8}",
        "[a-z]{0,8}",
        any::<bool>(),
        vec(("[A-Z0-9]{1,12}", "[a-z0-9.:]{0,16}"), 0..4),
    )
        .prop_map(
            |(server_id, server_name, cluster, auth_required, peers)| RouteInfo {
                server_id,
                server_name,
                cluster,
                route_addr: "0.0.0.0:6222".into(),
                client_addr: "127.0.0.1:4222".into(),
                auth_required,
                // A peer is built from its JSON: the type is not exported, only
                // its place in `RouteInfo` is.
                peers: peers
                    .into_iter()
                    .map(|(server_id, route_addr)| {
                        serde_json::from_value(serde_json::json!({
                            "server_id": server_id,
                            "route_addr": route_addr,
                        }))
                        .expect("a peer from its fields")
                    })
                    .collect(),
            },
        )
}

proptest! {
    #[test]
    fn route_ops_parse_the_same_however_split(
        ops in vec(route_op(), 0..10),
        chunks in chunks(),
    ) {
        let (wire, expected) = stream(ops);
        let limits = Limits::default();
        let whole = check_route_stream(&wire, &chunks, &limits);
        prop_assert_eq!(
            whole,
            Outcome { ops: expected.clone(), end: End::Leftover(Vec::new()) }
        );
        let bytewise = parse_chunked(&wire, &[1], &limits, parse_route_op);
        prop_assert_eq!(bytewise.ops, expected);
        prop_assert_eq!(bytewise.end, End::Leftover(Vec::new()));
    }

    /// A valid stream cut anywhere is never an error: the complete ops come
    /// out and the cut op waits, unconsumed.
    #[test]
    fn truncated_valid_stream_waits(
        ops in vec(route_op(), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let (wire, expected) = stream(ops);
        let cut = cut.index(wire.len() + 1);
        let got = check_route_stream(&wire[..cut], &[7], &Limits::default());
        prop_assert!(expected.starts_with(&got.ops));
        let End::Leftover(rest) = got.end else {
            return Err(TestCaseError::fail(format!("error on a prefix: {:?}", got.end)));
        };
        prop_assert!(wire[..cut].ends_with(&rest));
    }

    #[test]
    fn arbitrary_bytes_are_handled(
        data in prop_oneof![noise(), vec(any::<u8>(), 0..256)],
        chunks in chunks(),
        small in option::of((0usize..48, 0usize..48)),
    ) {
        let limits = match small {
            Some((max_control_line, max_payload)) => Limits { max_control_line, max_payload },
            None => Limits::default(),
        };
        check_route_stream(&data, &chunks, &limits);
    }

    /// Valid ops with tight limits: errors (MaxControlLine, MaxPayload) must
    /// not depend on how the stream was split either.
    #[test]
    fn limits_are_split_invariant(
        ops in vec(route_op(), 1..6),
        chunks in chunks(),
        max_control_line in 0usize..40,
        max_payload in 0usize..40,
    ) {
        let (wire, _) = stream(ops);
        let limits = Limits { max_control_line, max_payload };
        check_route_stream(&wire, &chunks, &limits);
        check_route_stream(&wire, &[1], &limits);
    }

    /// What a node says about itself in INFO reaches its peer intact: the
    /// text is the JSON `encode_route_info` wrote, and decodes to the same
    /// `RouteInfo`.
    #[test]
    fn route_info_round_trips(info in route_info(), chunks in chunks()) {
        let mut buf = BytesMut::new();
        encode_route_info(&mut buf, &info);
        let got = check_route_stream(&buf, &chunks, &Limits::default());
        prop_assert_eq!(got.end, End::Leftover(Vec::new()));
        let [RouteOp::Info(json)] = &got.ops[..] else {
            return Err(TestCaseError::fail(format!("not one INFO: {:?}", got.ops)));
        };
        let back: RouteInfo = serde_json::from_slice(json)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(back, info);
    }
}
