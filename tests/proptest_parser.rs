//! Property tests of the protocol parser.
//!
//! Streams of valid ops are generated together with the ops they must parse
//! to, rendered in every style the parser accepts (verbs in any case, `\n` or
//! `\r\n`, runs of spaces and tabs, payloads full of `\r` and `\n`). The
//! parser must give exactly those ops, whether fed the stream whole, in
//! random reads or one byte at a time. Arbitrary bytes must never panic, and
//! `Ok(None)` must never consume anything. The stream checks themselves live
//! in `fuzz/common/checks.rs`, shared with the fuzz targets.

#[path = "../fuzz/common/checks.rs"]
mod checks;

use bytes::Bytes;
use checks::{check_client_stream, check_server_stream, parse_chunked, End, Outcome};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use skiff::protocol::{parse_client_op, parse_server_op, ClientOp, Limits, Message, ServerOp};

/// How one op is written: verb case, separators, line ends, number style.
#[derive(Clone, Debug)]
struct Style {
    lowercase: u8,
    seps: Vec<Vec<u8>>,
    trailing: Vec<u8>,
    crlf: bool,
    payload_crlf: bool,
    zeros: usize,
}

fn blanks(min: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(prop_oneof![3 => Just(b' '), 1 => Just(b'\t')], min..4)
}

fn style() -> impl Strategy<Value = Style> {
    (
        any::<u8>(),
        vec(blanks(1), 6),
        prop_oneof![3 => Just(Vec::new()), 1 => blanks(1)],
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

impl Style {
    fn eol(&self) -> &'static [u8] {
        if self.crlf {
            b"\r\n"
        } else {
            b"\n"
        }
    }

    /// `verb sep arg sep arg ... [trailing blanks] eol`.
    fn line(&self, verb: &str, args: &[&[u8]]) -> Vec<u8> {
        let mut out: Vec<u8> = verb
            .bytes()
            .enumerate()
            .map(|(i, b)| {
                if self.lowercase >> i & 1 == 1 {
                    b.to_ascii_lowercase()
                } else {
                    b
                }
            })
            .collect();
        for (arg, sep) in args.iter().zip(&self.seps) {
            out.extend_from_slice(sep);
            out.extend_from_slice(arg);
        }
        // Trailing blanks are ignored after arguments, but part of the text
        // of CONNECT, INFO and -ERR.
        if !matches!(verb, "CONNECT" | "INFO" | "-ERR") {
            out.extend_from_slice(&self.trailing);
        }
        out.extend_from_slice(self.eol());
        out
    }

    /// A decimal number, maybe with leading zeros.
    fn num(&self, n: usize) -> Vec<u8> {
        let mut out = vec![b'0'; self.zeros];
        out.extend_from_slice(n.to_string().as_bytes());
        out
    }

    fn payload_end(&self) -> &'static [u8] {
        if self.payload_crlf {
            b"\r\n"
        } else {
            b"\n"
        }
    }
}

/// Subjects, sids, queue names: anything without blanks or line ends, mostly
/// from a small alphabet.
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

fn payload() -> impl Strategy<Value = Vec<u8>> {
    vec(
        prop_oneof![4 => any::<u8>(), 1 => Just(b'\r'), 1 => Just(b'\n')],
        0..48,
    )
}

/// Text after CONNECT / INFO: real JSON or any printable run, never starting
/// with a blank.
fn json() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (any::<bool>(), "[a-z ]{0,8}").prop_map(|(verbose, name)| {
            format!(r#"{{"verbose":{verbose},"name":"{name}","headers":true}}"#).into_bytes()
        }),
        // As Python's json.dumps writes it: a blank after every `,` and `:`.
        (any::<bool>(), "[a-z ]{0,8}").prop_map(|(verbose, name)| {
            format!(r#"{{"echo": true, "headers": true, "name": "{name}", "pedantic": false, "verbose": {verbose}}}"#)
                .into_bytes()
        }),
        "[!-~][ -~]{0,30}".prop_map(String::into_bytes),
    ]
}

/// The message part (size arguments, payload) of PUB/HPUB/MSG/HMSG.
/// Returns `(size args, payload bytes, header_len)`.
fn sized_payload(
    style: &Style,
    headers: Option<Vec<u8>>,
    body: Vec<u8>,
) -> (Vec<Vec<u8>>, Vec<u8>, Option<usize>) {
    match headers {
        None => (vec![style.num(body.len())], body, None),
        Some(mut h) => {
            let hl = h.len();
            h.extend_from_slice(&body);
            (vec![style.num(hl), style.num(h.len())], h, Some(hl))
        }
    }
}

fn message_wire(
    style: &Style,
    verb: &str,
    mut args: Vec<Vec<u8>>,
    headers: Option<Vec<u8>>,
    body: Vec<u8>,
) -> (Vec<u8>, Vec<u8>, Option<usize>) {
    let (sizes, payload, header_len) = sized_payload(style, headers, body);
    args.extend(sizes);
    let argv: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
    let mut wire = style.line(verb, &argv);
    wire.extend_from_slice(&payload);
    wire.extend_from_slice(style.payload_end());
    (wire, payload, header_len)
}

fn headers() -> impl Strategy<Value = Option<Vec<u8>>> {
    option::of(prop_oneof![
        Just(b"NATS/1.0\r\n\r\n".to_vec()),
        "[a-z]{1,5}".prop_map(|v| format!("NATS/1.0\r\nX-K: {v}\r\n\r\n").into_bytes()),
        payload(),
    ])
}

/// One client op: its wire form and the op it must parse to.
fn client_op() -> impl Strategy<Value = (Vec<u8>, ClientOp)> {
    prop_oneof![
        3 => (word(), option::of(word()), headers(), payload(), style()).prop_map(
            |(subject, reply, headers, body, style)| {
                let verb = if headers.is_some() { "HPUB" } else { "PUB" };
                let mut args = vec![subject.clone()];
                args.extend(reply.clone());
                let (wire, payload, header_len) = message_wire(&style, verb, args, headers, body);
                let op = ClientOp::Pub(Message::new(&subject, reply.as_deref(), header_len, &payload));
                (wire, op)
            }
        ),
        2 => (word(), option::of(word()), word(), style()).prop_map(
            |(subject, queue, sid, style)| {
                let mut args: Vec<&[u8]> = vec![&subject];
                args.extend(queue.as_deref());
                args.push(&sid);
                let wire = style.line("SUB", &args);
                let op = ClientOp::Sub {
                    subject: subject.into(),
                    queue: queue.map(Bytes::from),
                    sid: sid.into(),
                };
                (wire, op)
            }
        ),
        1 => (word(), option::of(0u64..1_000_000_000), style()).prop_map(|(sid, max, style)| {
            let max_text = max.map(|m| style.num(m as usize));
            let mut args: Vec<&[u8]> = vec![&sid];
            args.extend(max_text.as_deref());
            let wire = style.line("UNSUB", &args);
            (wire, ClientOp::Unsub { sid: sid.into(), max })
        }),
        1 => style().prop_map(|s| (s.line("PING", &[]), ClientOp::Ping)),
        1 => style().prop_map(|s| (s.line("PONG", &[]), ClientOp::Pong)),
        1 => (json(), style()).prop_map(|(json, style)| {
            let wire = style.line("CONNECT", &[&json]);
            (wire, ClientOp::Connect(json.into()))
        }),
    ]
}

/// One server op: its wire form and the op it must parse to.
fn server_op() -> impl Strategy<Value = (Vec<u8>, ServerOp)> {
    prop_oneof![
        3 => (word(), word(), option::of(word()), headers(), payload(), style()).prop_map(
            |(subject, sid, reply, headers, body, style)| {
                let verb = if headers.is_some() { "HMSG" } else { "MSG" };
                let mut args = vec![subject.clone(), sid.clone()];
                args.extend(reply.clone());
                let (wire, payload, header_len) = message_wire(&style, verb, args, headers, body);
                let message = Message::new(&subject, reply.as_deref(), header_len, &payload);
                (wire, ServerOp::Msg { sid: sid.into(), message })
            }
        ),
        1 => (json(), style()).prop_map(|(json, style)| {
            (style.line("INFO", &[&json]), ServerOp::Info(json.into()))
        }),
        1 => ("'[A-Za-z \"]{0,40}'", style()).prop_map(|(text, style)| {
            let text = text.into_bytes();
            (style.line("-ERR", &[&text]), ServerOp::Err(text.into()))
        }),
        1 => style().prop_map(|s| (s.line("+OK", &[]), ServerOp::Ok)),
        1 => style().prop_map(|s| (s.line("PING", &[]), ServerOp::Ping)),
        1 => style().prop_map(|s| (s.line("PONG", &[]), ServerOp::Pong)),
    ]
}

fn stream<Op>(ops: Vec<(Vec<u8>, Op)>) -> (Vec<u8>, Vec<Op>) {
    let mut wire = Vec::new();
    let mut expected = Vec::new();
    for (bytes, op) in ops {
        wire.extend(bytes);
        expected.push(op);
    }
    (wire, expected)
}

/// Byte soup made of protocol fragments, so that the parser gets past the
/// verb more often than with uniform bytes.
fn noise() -> impl Strategy<Value = Vec<u8>> {
    let fragment = prop_oneof![
        Just(b"PUB ".to_vec()),
        Just(b"hpub ".to_vec()),
        Just(b"SUB ".to_vec()),
        Just(b"UNSUB ".to_vec()),
        Just(b"MSG ".to_vec()),
        Just(b"HMSG ".to_vec()),
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

fn limits(small: Option<(usize, usize)>) -> Limits {
    match small {
        Some((max_control_line, max_payload)) => Limits {
            max_control_line,
            max_payload,
        },
        None => Limits::default(),
    }
}

fn chunks() -> impl Strategy<Value = Vec<usize>> {
    vec(prop_oneof![1 => Just(0usize), 8 => 1usize..24], 1..6)
}

proptest! {
    #[test]
    fn client_ops_parse_the_same_however_split(
        ops in vec(client_op(), 0..10),
        chunks in chunks(),
    ) {
        let (wire, expected) = stream(ops);
        let limits = Limits::default();
        let whole = check_client_stream(&wire, &chunks, &limits);
        prop_assert_eq!(
            whole,
            Outcome { ops: expected.clone(), end: End::Leftover(Vec::new()) }
        );
        let bytewise = parse_chunked(&wire, &[1], &limits, parse_client_op);
        prop_assert_eq!(bytewise.ops, expected);
        prop_assert_eq!(bytewise.end, End::Leftover(Vec::new()));
    }

    #[test]
    fn server_ops_parse_the_same_however_split(
        ops in vec(server_op(), 0..10),
        chunks in chunks(),
    ) {
        let (wire, expected) = stream(ops);
        let limits = Limits::default();
        let whole = check_server_stream(&wire, &chunks, &limits);
        prop_assert_eq!(
            whole,
            Outcome { ops: expected.clone(), end: End::Leftover(Vec::new()) }
        );
        let bytewise = parse_chunked(&wire, &[1], &limits, parse_server_op);
        prop_assert_eq!(bytewise.ops, expected);
        prop_assert_eq!(bytewise.end, End::Leftover(Vec::new()));
    }

    /// A valid stream cut anywhere is never an error: the complete ops come
    /// out and the cut op waits, unconsumed.
    #[test]
    fn truncated_valid_stream_waits(ops in vec(client_op(), 1..6), cut in any::<prop::sample::Index>()) {
        let (wire, expected) = stream(ops);
        let cut = cut.index(wire.len() + 1);
        let got = check_client_stream(&wire[..cut], &[7], &Limits::default());
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
        let limits = limits(small);
        check_client_stream(&data, &chunks, &limits);
        check_server_stream(&data, &chunks, &limits);
    }

    /// Valid ops with tight limits: errors (MaxControlLine, MaxPayload) must
    /// not depend on how the stream was split either.
    #[test]
    fn limits_are_split_invariant(
        ops in vec(client_op(), 1..6),
        chunks in chunks(),
        max_control_line in 0usize..40,
        max_payload in 0usize..40,
    ) {
        let (wire, _) = stream(ops);
        let limits = Limits { max_control_line, max_payload };
        check_client_stream(&wire, &chunks, &limits);
        check_client_stream(&wire, &[1], &limits);
    }
}

/// Regression: a control line of exactly `max_control_line` bytes ending in
/// `\r\n`, read up to the `\r`, used to be refused as too long while the same
/// bytes read at once were accepted.
#[test]
fn control_line_of_max_length_split_before_lf() {
    let limits = Limits {
        max_control_line: 8,
        max_payload: 16,
    };
    let wire = b"SUB a 12\r\n";
    let whole = check_client_stream(wire, &[9, 1], &limits);
    assert_eq!(whole.ops.len(), 1, "{whole:?}");
    let too_long = check_client_stream(b"SUB a 123\r\n", &[9, 1], &limits);
    assert_eq!(
        too_long.end,
        End::Error(skiff::protocol::ProtocolError::MaxControlLine)
    );
}

/// Regression: CONNECT, INFO and -ERR text used to be split into arguments
/// and refused when it held more than five words, so JSON with blanks (as
/// Python's `json.dumps` writes it) or a long `-ERR` text failed to parse.
#[test]
fn free_text_may_hold_many_blanks() {
    let json = br#"{"echo": true, "headers": true, "lang": "python3", "pedantic": false, "verbose": false}"#;
    let mut wire = b"CONNECT ".to_vec();
    wire.extend_from_slice(json);
    wire.extend_from_slice(b"\r\n");
    let got = check_client_stream(&wire, &[1], &Limits::default());
    assert_eq!(got.ops, vec![ClientOp::Connect(Bytes::from_static(json))]);

    let text = br#"'Permissions Violation for Publish to "a.b"'"#;
    let mut wire = b"-ERR ".to_vec();
    wire.extend_from_slice(text);
    wire.extend_from_slice(b"\r\n");
    let got = check_server_stream(&wire, &[3], &Limits::default());
    assert_eq!(got.ops, vec![ServerOp::Err(Bytes::from_static(text))]);
}
