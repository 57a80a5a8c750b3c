//! A connection's read buffer, sized to its traffic.
//!
//! Idle connections are the common case for device fleets, so a connection
//! starts with a small buffer and gives memory back when it goes quiet; a
//! busy one grows to [`MAX_TARGET`] so that one read (and one parse pass)
//! covers many messages. Payloads handed to subscribers are `Bytes` slices of
//! this buffer, so growing never moves bytes a subscriber still holds.
//!
//! A slice keeps its whole allocation alive, so the buffer knows the size of
//! the allocation it is reading into ([`ReadBuffer::alloc`]): the reader
//! tells each message parsed from it ([`crate::protocol::Message::pins`]),
//! and an outbound queue copies a payload rather than keep a buffer much
//! larger than it.

use bytes::BytesMut;

/// Room offered to a new or quiet connection's reads.
const MIN_TARGET: usize = 512;
/// Room offered to a busy connection's reads.
const MAX_TARGET: usize = 64 * 1024;

pub(crate) struct ReadBuffer {
    pub buf: BytesMut,
    /// How much free room the next read gets.
    target: usize,
    /// Size of the allocation `buf`'s bytes and room lie in.
    alloc: usize,
}

impl ReadBuffer {
    pub fn new() -> ReadBuffer {
        ReadBuffer {
            buf: BytesMut::new(),
            target: MIN_TARGET,
            alloc: 0,
        }
    }

    /// Makes room for the next read and returns how much there is.
    pub fn prepare(&mut self) -> usize {
        if self.buf.capacity() - self.buf.len() < self.target && !self.buf.try_reclaim(self.target)
        {
            // A new allocation, made here rather than by `reserve` so that
            // its size is known. An op still arriving (a large payload)
            // grows it by half at least, so that it is copied a bounded
            // number of times however it is split into reads.
            let len = self.buf.len();
            let alloc = (len + self.target).max(len + len / 2);
            let mut fresh = BytesMut::with_capacity(alloc);
            fresh.extend_from_slice(&self.buf);
            self.buf = fresh;
            self.alloc = alloc;
        }
        self.buf.capacity() - self.buf.len()
    }

    /// Size of the allocation the buffer reads into: what a slice of what
    /// it holds keeps alive, at most.
    pub fn alloc(&self) -> usize {
        self.alloc
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
            self.alloc = 0;
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

    #[test]
    fn knows_the_size_of_the_allocation_it_reads_into() {
        let mut rb = ReadBuffer::new();
        rb.prepare();
        assert_eq!(rb.alloc(), MIN_TARGET);
        rb.buf.extend_from_slice(&[b'x'; MIN_TARGET]);
        // A slice handed out pins the allocation: the next one is new.
        let pinned = rb.buf.split_to(100).freeze();
        rb.prepare();
        assert!(rb.buf.capacity() - rb.buf.len() >= MIN_TARGET);
        assert_eq!(rb.alloc(), MIN_TARGET - 100 + MIN_TARGET);
        assert_eq!(rb.buf.capacity(), rb.alloc());
        drop(pinned);
        // An op still arriving fills the buffer: it grows by half at least.
        let room = rb.buf.capacity() - rb.buf.len();
        rb.buf.extend_from_slice(&vec![b'y'; room]);
        let len = rb.buf.len();
        rb.prepare();
        assert_eq!(rb.alloc(), (len + MIN_TARGET).max(len + len / 2));
        assert_eq!(rb.buf.capacity(), rb.alloc());
    }
}
