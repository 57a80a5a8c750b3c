//! A connection's read buffer, sized to its traffic.
//!
//! Idle connections are the common case for device fleets, so a connection
//! starts with a small buffer and gives memory back when it goes quiet; a
//! busy one grows to [`MAX_TARGET`] so that one read (and one parse pass)
//! covers many messages. Payloads handed to subscribers are `Bytes` slices of
//! this buffer, so growing never moves bytes a subscriber still holds.

use bytes::BytesMut;

/// Room offered to a new or quiet connection's reads.
const MIN_TARGET: usize = 512;
/// Room offered to a busy connection's reads.
const MAX_TARGET: usize = 64 * 1024;

pub(crate) struct ReadBuffer {
    pub buf: BytesMut,
    /// How much free room the next read gets.
    target: usize,
}

impl ReadBuffer {
    pub fn new() -> ReadBuffer {
        ReadBuffer {
            buf: BytesMut::new(),
            target: MIN_TARGET,
        }
    }

    /// Makes room for the next read and returns how much there is.
    pub fn prepare(&mut self) -> usize {
        if self.buf.capacity() - self.buf.len() < self.target {
            self.buf.reserve(self.target);
        }
        self.buf.capacity() - self.buf.len()
    }

    /// Adapts the target after a read of `n` bytes into `room` bytes: a read
    /// that filled the room means more is waiting; one far below it means
    /// the connection is quiet.
    pub fn record(&mut self, n: usize, room: usize) {
        if n >= room {
            self.target = (self.target * 2).min(MAX_TARGET);
        } else if n < self.target / 4 {
            self.target = (self.target / 2).max(MIN_TARGET);
        }
    }

    /// After the read batch is handled: a quiet connection with nothing
    /// buffered drops its large allocation.
    pub fn settle(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > self.target * 2 {
            self.buf = BytesMut::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_when_reads_fill_it_and_shrinks_when_quiet() {
        let mut rb = ReadBuffer::new();
        let room = rb.prepare();
        assert!(room >= MIN_TARGET);
        for _ in 0..10 {
            let room = rb.prepare();
            rb.record(room, room);
        }
        assert_eq!(rb.target, MAX_TARGET);
        for _ in 0..20 {
            rb.record(10, rb.target);
        }
        assert_eq!(rb.target, MIN_TARGET);
        rb.settle();
        assert!(rb.buf.capacity() <= MIN_TARGET * 2);
    }
}
