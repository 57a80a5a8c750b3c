//! Encoding: typed values to wire bytes, appended to a caller's buffer so the
//! hot path never allocates (numbers go through `itoa`, not `format!`).

use std::fmt::Display;

use bytes::{BufMut, BytesMut};

use super::{ConnectOptions, ServerInfo};

pub const CRLF: &[u8] = b"\r\n";
pub const OK: &[u8] = b"+OK\r\n";
pub const PING: &[u8] = b"PING\r\n";
pub const PONG: &[u8] = b"PONG\r\n";

#[inline]
pub(crate) fn put_num(buf: &mut BytesMut, n: usize) {
    buf.put_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// `-ERR 'text'`.
pub fn encode_err(buf: &mut BytesMut, text: &dyn Display) {
    buf.put_slice(format!("-ERR '{text}'\r\n").as_bytes());
}

/// `INFO {json}`.
pub fn encode_info(buf: &mut BytesMut, info: &ServerInfo) {
    json_line(buf, b"INFO ", info);
}

/// `CONNECT {json}`.
pub fn encode_connect(buf: &mut BytesMut, options: &ConnectOptions) {
    json_line(buf, b"CONNECT ", options);
}

pub(crate) fn json_line(buf: &mut BytesMut, verb: &[u8], value: &impl serde::Serialize) {
    buf.put_slice(verb);
    // Serialising plain structs of strings and numbers cannot fail.
    let json = serde_json::to_vec(value).unwrap_or_default();
    buf.put_slice(&json);
    buf.put_slice(CRLF);
}

/// The control line of a delivery: `MSG subject sid [reply] len` or, with
/// headers, `HMSG subject sid [reply] hdr_len total_len`. The payload and its
/// CRLF follow separately.
pub fn encode_msg_header(
    buf: &mut BytesMut,
    subject: &[u8],
    sid: &[u8],
    reply: Option<&[u8]>,
    header_len: Option<usize>,
    total_len: usize,
) {
    buf.put_slice(if header_len.is_some() {
        b"HMSG "
    } else {
        b"MSG "
    });
    buf.put_slice(subject);
    buf.put_u8(b' ');
    buf.put_slice(sid);
    sizes_tail(buf, reply, header_len, total_len);
}

/// The control line of a publish: `PUB subject [reply] len` or `HPUB ...`.
pub fn encode_pub_header(
    buf: &mut BytesMut,
    subject: &[u8],
    reply: Option<&[u8]>,
    header_len: Option<usize>,
    total_len: usize,
) {
    buf.put_slice(if header_len.is_some() {
        b"HPUB "
    } else {
        b"PUB "
    });
    buf.put_slice(subject);
    sizes_tail(buf, reply, header_len, total_len);
}

#[inline]
pub(crate) fn sizes_tail(
    buf: &mut BytesMut,
    reply: Option<&[u8]>,
    header_len: Option<usize>,
    total: usize,
) {
    if let Some(reply) = reply {
        buf.put_u8(b' ');
        buf.put_slice(reply);
    }
    if let Some(h) = header_len {
        buf.put_u8(b' ');
        put_num(buf, h);
    }
    buf.put_u8(b' ');
    put_num(buf, total);
    buf.put_slice(CRLF);
}

/// `SUB subject [queue] sid`.
pub fn encode_sub(buf: &mut BytesMut, subject: &[u8], queue: Option<&[u8]>, sid: &[u8]) {
    buf.put_slice(b"SUB ");
    buf.put_slice(subject);
    if let Some(q) = queue {
        buf.put_u8(b' ');
        buf.put_slice(q);
    }
    buf.put_u8(b' ');
    buf.put_slice(sid);
    buf.put_slice(CRLF);
}

/// `UNSUB sid [max]`.
pub fn encode_unsub(buf: &mut BytesMut, sid: &[u8], max: Option<u64>) {
    buf.put_slice(b"UNSUB ");
    buf.put_slice(sid);
    if let Some(max) = max {
        buf.put_u8(b' ');
        put_num(buf, max as usize);
    }
    buf.put_slice(CRLF);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msg_headers_match_the_wire_format() {
        let mut buf = BytesMut::new();
        encode_msg_header(&mut buf, b"foo", b"1", None, None, 5);
        encode_msg_header(&mut buf, b"foo", b"1", Some(b"r"), Some(12), 14);
        assert_eq!(&buf[..], b"MSG foo 1 5\r\nHMSG foo 1 r 12 14\r\n");
    }

    #[test]
    fn errors_are_quoted() {
        let mut buf = BytesMut::new();
        encode_err(&mut buf, &"Invalid Subject");
        assert_eq!(&buf[..], b"-ERR 'Invalid Subject'\r\n");
    }
}
