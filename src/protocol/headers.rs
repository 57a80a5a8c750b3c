//! NATS message headers: the `NATS/1.0 [status [description]]` block that
//! HPUB/HMSG carry before the data.
//!
//! Reading is zero-allocation lookups over the raw block (the server only
//! ever asks for a few names, like `Nats-Msg-Id`); writing builds a block for
//! the server's own status messages and stream deliveries. Names are matched
//! exactly, as nats-server does.

use bytes::{BufMut, BytesMut};

/// The first line of every header block.
pub const VERSION_LINE: &[u8] = b"NATS/1.0";

/// The lines of a header block after the version line, as `(name, value)`.
pub fn fields(block: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    block
        .split(|&b| b == b'\n')
        .skip(1)
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .filter_map(|line| {
            let colon = line.iter().position(|&b| b == b':')?;
            Some((&line[..colon], line[colon + 1..].trim_ascii()))
        })
}

/// The value of the first header called `name`.
pub fn header_value<'a>(block: &'a [u8], name: &str) -> Option<&'a [u8]> {
    fields(block)
        .find(|(n, _)| *n == name.as_bytes())
        .map(|(_, v)| v)
}

/// The value of header `name` as UTF-8 text.
pub fn header_str<'a>(block: &'a [u8], name: &str) -> Option<&'a str> {
    header_value(block, name).and_then(|v| std::str::from_utf8(v).ok())
}

/// The status code of the version line (`NATS/1.0 503` → 503).
pub fn status(block: &[u8]) -> Option<u16> {
    let first = block.split(|&b| b == b'\r' || b == b'\n').next()?;
    let rest = first.strip_prefix(VERSION_LINE)?.trim_ascii_start();
    let code = rest.split(|&b| b == b' ').next()?;
    std::str::from_utf8(code).ok()?.parse().ok()
}

/// Builds a header block.
pub struct HeaderBlock {
    buf: BytesMut,
}

impl HeaderBlock {
    /// `NATS/1.0`, or `NATS/1.0 code description` for a status message.
    pub fn new(status: Option<(u16, &str)>) -> HeaderBlock {
        let mut buf = BytesMut::with_capacity(64);
        buf.put_slice(VERSION_LINE);
        if let Some((code, description)) = status {
            buf.put_u8(b' ');
            buf.put_slice(itoa::Buffer::new().format(code).as_bytes());
            if !description.is_empty() {
                buf.put_u8(b' ');
                buf.put_slice(description.as_bytes());
            }
        }
        buf.put_slice(b"\r\n");
        HeaderBlock { buf }
    }

    /// Adds `name: value`.
    pub fn add(mut self, name: &str, value: &str) -> HeaderBlock {
        self.buf.put_slice(name.as_bytes());
        self.buf.put_slice(b": ");
        self.buf.put_slice(value.as_bytes());
        self.buf.put_slice(b"\r\n");
        self
    }

    /// The finished block, ending in the blank line.
    pub fn finish(mut self) -> BytesMut {
        self.buf.put_slice(b"\r\n");
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields_and_status() {
        let block = b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 5\r\nA:b\r\n\r\n";
        assert_eq!(status(block), Some(408));
        assert_eq!(
            header_value(block, "Nats-Pending-Messages"),
            Some(&b"5"[..])
        );
        assert_eq!(header_value(block, "A"), Some(&b"b"[..]));
        assert_eq!(header_value(block, "nats-pending-messages"), None);
        assert_eq!(status(b"NATS/1.0\r\n\r\n"), None);
    }

    #[test]
    fn builds_blocks() {
        let block = HeaderBlock::new(Some((404, "No Messages"))).finish();
        assert_eq!(&block[..], b"NATS/1.0 404 No Messages\r\n\r\n");
        let block = HeaderBlock::new(None).add("Nats-Msg-Id", "1").finish();
        assert_eq!(&block[..], b"NATS/1.0\r\nNats-Msg-Id: 1\r\n\r\n");
    }
}
