//! One client's outbound queue: what the server has decided to send it and
//! the socket has not yet taken.
//!
//! Publishers on any task append frames under a short mutex (never held
//! across an `.await`); the client's writer task takes everything queued in
//! one swap and writes it with vectored writes, so many messages share one
//! syscall.
//!
//! Invariants:
//! - The queue is bounded by `max_pending` bytes (queued plus being written).
//!   A push that would exceed it does not enqueue: the client is marked a slow
//!   consumer and cut off. Messages are never silently dropped for a client
//!   that stays connected, and a publisher never waits on a slow reader.
//! - What counts against `max_pending` is the memory the queue keeps alive,
//!   not only the bytes it will write: a payload shared with the publisher's
//!   read buffer keeps that whole buffer alive, and is charged for all of it
//!   (see below), until the batch it was taken in has been written.
//! - Frames are appended whole under the lock, so the writer only ever sees
//!   complete frames and a batch boundary is a frame boundary.
//!
//! Shared or copied: a payload is queued as a `Bytes` slice of the
//! publisher's read buffer (zero-copy) when it is at least [`SHARE_MIN`]
//! bytes and makes up at least half of the allocation it lies in
//! ([`Message::pins`]); it is then charged for that allocation, at most
//! twice its size. Any other payload is copied into the control-line arena,
//! where it costs exactly its size: a few bytes copied cost less than a
//! refcount and an iovec, and a 4 KiB message must not keep a 64 KiB read
//! buffer alive in a slow consumer's queue (with only slices, a queue of
//! 4 MiB could hold 64 MiB). In practice large messages, which fill their
//! read buffers, are shared, and the rest are copied with no allocation of
//! their own (the arena grows in large steps). The deciding test is one
//! comparison per message.

use std::collections::VecDeque;

use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::protocol::{encode_msg_header, Message, CRLF};

/// Payloads this large or larger are shared, not copied.
pub const SHARE_MIN: usize = 2048;

/// Arena growth step while the writer is behind: one allocation serves many
/// frames.
const ARENA_BUSY: usize = 64 * 1024;
/// Arena growth step for an idle queue, so that idle connections hold little.
const ARENA_IDLE: usize = 512;
/// A batch smaller than this means the connection is quiet: the writer
/// releases the arena instead of keeping its capacity.
const QUIET_BATCH: usize = 4 * 1024;

/// Why a push did not enqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// The queue would exceed `max_pending`: the client must be cut off.
    SlowConsumer,
    /// The client is already closing.
    Closed,
}

/// A push that succeeded; `wake` is true when the writer is idle and must be
/// woken (by [`Outbound::wake`]) for the frame to go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pushed {
    pub wake: bool,
}

struct Queue {
    /// Complete, ready-to-write chunks, oldest first.
    chunks: VecDeque<Bytes>,
    /// Bytes appended after the last chunk: control lines and copied
    /// payloads.
    arena: BytesMut,
    /// Bytes queued or being written, plus what shared payloads pin beyond
    /// themselves: checked against `max_pending`.
    pending: usize,
    /// The part of `pending` charged for what shared payloads pin beyond
    /// their own bytes: for those still queued, and for those the writer
    /// took in its last batch (given back when it comes for the next one,
    /// as by then it has written and dropped them).
    pinned_queued: usize,
    pinned_taken: usize,
    /// The writer has been asked to run and has not yet taken the queue.
    wake_requested: bool,
    closed: bool,
    /// Messages and their payload bytes queued so far (for monitoring;
    /// counted under the lock the push takes anyway, so they cost nothing).
    msgs: u64,
    msg_bytes: u64,
}

/// The outbound queue of one client. See the module docs for its bound.
pub struct Outbound {
    queue: Mutex<Queue>,
    notify: Notify,
    max_pending: usize,
}

impl Outbound {
    pub fn new(max_pending: usize) -> Outbound {
        Outbound {
            queue: Mutex::new(Queue {
                chunks: VecDeque::new(),
                arena: BytesMut::new(),
                pending: 0,
                pinned_queued: 0,
                pinned_taken: 0,
                wake_requested: false,
                closed: false,
                msgs: 0,
                msg_bytes: 0,
            }),
            notify: Notify::new(),
            max_pending,
        }
    }

    /// Queues a `MSG`/`HMSG` delivery of `msg` for subscription `sid`.
    /// Without `headers`, a message with headers is delivered as a plain
    /// `MSG` with the header block stripped, as nats-server does.
    pub fn push_msg(&self, sid: &[u8], msg: &Message, headers: bool) -> Result<Pushed, PushError> {
        let (header_len, payload) = match msg.header_len() {
            Some(h) if headers => (Some(h), msg.payload()),
            Some(_) => (None, msg.data()),
            None => (None, msg.payload()),
        };
        // An upper bound of the control line: verb, spaces and two numbers.
        let line_len = 32 + msg.subject().len() + sid.len() + msg.reply().map_or(0, <[u8]>::len);
        self.push_frame(line_len, msg, payload, |arena| {
            encode_msg_header(
                arena,
                msg.subject(),
                sid,
                msg.reply(),
                header_len,
                payload.len(),
            )
        })
    }

    /// Queues one frame carrying (part of) `msg`'s body: the control line
    /// `encode_line` writes (at most `line_len` bytes), then `payload` (a
    /// tail of `msg.payload()`), then CRLF. The payload is shared or copied
    /// as the module docs say.
    pub fn push_frame(
        &self,
        line_len: usize,
        msg: &Message,
        payload: &[u8],
        encode_line: impl FnOnce(&mut BytesMut),
    ) -> Result<Pushed, PushError> {
        // What sharing would keep alive beyond the payload itself.
        let beyond = msg.pins().saturating_sub(payload.len());
        let share = payload.len() >= SHARE_MIN && beyond <= payload.len();
        let pinned = if share { beyond } else { 0 };
        let bound = line_len + payload.len() + CRLF.len() + pinned;
        self.push_with(bound, |q| {
            q.reserve(line_len + SHARE_MIN);
            let mark = q.arena.len();
            encode_line(&mut q.arena);
            let added = q.arena.len() - mark + payload.len() + CRLF.len();
            if share {
                let head = q.arena.split().freeze();
                q.chunks.push_back(head);
                let body = msg.payload_bytes();
                q.chunks.push_back(body.slice(body.len() - payload.len()..));
                q.pinned_queued += pinned;
            } else {
                q.arena.put_slice(payload);
            }
            q.arena.put_slice(CRLF);
            q.msgs += 1;
            q.msg_bytes += payload.len() as u64;
            added + pinned
        })
    }

    /// Queues raw protocol bytes (`PONG`, `+OK`, `-ERR`, `INFO`, `PING`).
    pub fn push_bytes(&self, bytes: &[u8]) -> Result<Pushed, PushError> {
        self.push_with(bytes.len(), |q| {
            q.reserve(bytes.len());
            q.arena.put_slice(bytes);
            bytes.len()
        })
    }

    /// Appends under the lock if `bound` (an upper bound of the frame's size)
    /// fits; `append` returns the exact number of bytes it queued.
    fn push_with(
        &self,
        bound: usize,
        append: impl FnOnce(&mut Queue) -> usize,
    ) -> Result<Pushed, PushError> {
        let mut q = self.queue.lock();
        if q.closed {
            return Err(PushError::Closed);
        }
        if q.pending + bound > self.max_pending {
            return Err(PushError::SlowConsumer);
        }
        let added = append(&mut q);
        q.pending += added;
        let wake = !std::mem::replace(&mut q.wake_requested, true);
        Ok(Pushed { wake })
    }

    /// Wakes the writer. Publishers call this once per touched client after
    /// a whole read batch, so that one write carries the whole batch.
    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// Refuses all further pushes. Already queued frames may still be taken.
    pub fn close(&self) {
        self.queue.lock().closed = true;
        self.notify.notify_one();
    }

    /// Bytes queued or being written, with what shared payloads among them
    /// keep alive (see the module docs).
    pub fn pending(&self) -> usize {
        self.queue.lock().pending
    }

    /// Messages queued so far, and their payload bytes.
    pub fn delivered(&self) -> (u64, u64) {
        let q = self.queue.lock();
        (q.msgs, q.msg_bytes)
    }

    /// Writer side: records that `written` bytes left, then moves every queued
    /// chunk into `into` (which must be empty). Returns `false` when there is
    /// nothing to write and the queue is closed: the writer is done.
    ///
    /// `into` being empty means the chunks of the previous batch have all
    /// been written and dropped, so the buffers they pinned are released.
    pub(crate) fn take(&self, written: usize, into: &mut VecDeque<Bytes>) -> bool {
        let mut q = self.queue.lock();
        let released = written + q.pinned_taken;
        q.pending -= released.min(q.pending);
        q.pinned_taken = std::mem::take(&mut q.pinned_queued);
        q.wake_requested = false;
        if !q.arena.is_empty() {
            let tail = q.arena.split().freeze();
            if tail.len() < QUIET_BATCH {
                q.arena = BytesMut::new();
            }
            q.chunks.push_back(tail);
        }
        std::mem::swap(&mut q.chunks, into);
        !(into.is_empty() && q.closed)
    }

    /// Writer side: waits until something may have been queued.
    pub(crate) async fn notified(&self) {
        self.notify.notified().await
    }
}

impl Queue {
    /// Makes room in the arena: in large steps while the writer is behind,
    /// so that appends rarely allocate, and in small ones when idle.
    fn reserve(&mut self, additional: usize) {
        if self.arena.capacity() - self.arena.len() < additional {
            let step = if self.pending > 0 {
                ARENA_BUSY
            } else {
                ARENA_IDLE
            };
            self.arena.reserve(additional.max(step));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(payload: &[u8]) -> Message {
        Message::new(b"foo", None, None, payload)
    }

    fn drain(out: &Outbound) -> Vec<u8> {
        let mut chunks = VecDeque::new();
        out.take(0, &mut chunks);
        chunks.iter().flat_map(|c| c.iter().copied()).collect()
    }

    #[test]
    fn frames_are_encoded_in_order_and_wake_once() {
        let out = Outbound::new(1 << 20);
        assert_eq!(
            out.push_msg(b"1", &msg(b"hi"), true),
            Ok(Pushed { wake: true })
        );
        assert_eq!(out.push_bytes(b"PONG\r\n"), Ok(Pushed { wake: false }));
        let big = vec![b'x'; SHARE_MIN];
        let big_msg = msg(&big);
        out.push_msg(b"2", &big_msg, true).unwrap();
        let mut expected = b"MSG foo 1 2\r\nhi\r\nPONG\r\n".to_vec();
        expected.extend_from_slice(format!("MSG foo 2 {}\r\n", SHARE_MIN).as_bytes());
        expected.extend_from_slice(&big);
        expected.extend_from_slice(b"\r\n");
        assert_eq!(drain(&out), expected);
    }

    #[test]
    fn headers_are_stripped_for_clients_without_them() {
        let out = Outbound::new(1 << 20);
        let m = Message::new(b"foo", None, Some(12), b"NATS/1.0\r\n\r\nhi");
        out.push_msg(b"1", &m, false).unwrap();
        assert_eq!(drain(&out), b"MSG foo 1 2\r\nhi\r\n");
    }

    /// `msg(payload)` as if parsed from a read buffer of `pins` bytes.
    fn parsed(payload: &[u8], pins: usize) -> Message {
        let mut m = msg(payload);
        m.set_pins(pins);
        m
    }

    #[test]
    fn payloads_are_shared_only_when_they_fill_half_their_buffer() {
        let out = Outbound::new(1 << 20);
        let payload = vec![b'x'; 4096];
        let frame = 4096 + "MSG foo 1 4096\r\n\r\n".len();
        // Alone in its buffer: shared, charged for the whole buffer.
        out.push_msg(b"1", &parsed(&payload, 8192), true).unwrap();
        assert_eq!(out.pending(), frame + 4096);
        // A small part of a large buffer: copied, charged for itself.
        out.push_msg(b"1", &parsed(&payload, 64 * 1024), true)
            .unwrap();
        assert_eq!(out.pending(), 2 * frame + 4096);
        // Unknown buffer (`Message::from_parts`' default): copied.
        out.push_msg(b"1", &parsed(&payload, usize::MAX), true)
            .unwrap();
        assert_eq!(out.pending(), 3 * frame + 4096);
        let mut chunks = VecDeque::new();
        out.take(0, &mut chunks);
        // The shared payload is a chunk of its own; the copied ones are in
        // the arena with the control lines.
        assert!(chunks.iter().any(|c| c.len() == 4096));
        let written: usize = chunks.iter().map(Bytes::len).sum();
        assert_eq!(written, 3 * frame);
        // Still charged while the batch is being written...
        assert_eq!(out.pending(), 3 * frame + 4096);
        // ...and released once the writer is back for more.
        chunks.clear();
        out.take(written, &mut chunks);
        assert_eq!(out.pending(), 0);
    }

    #[test]
    fn exceeding_max_pending_is_a_slow_consumer() {
        let out = Outbound::new(100);
        out.push_msg(b"1", &msg(b"0123456789"), true).unwrap();
        let mut refused = false;
        for _ in 0..10 {
            if out.push_msg(b"1", &msg(b"0123456789"), true) == Err(PushError::SlowConsumer) {
                refused = true;
                break;
            }
        }
        assert!(refused);
        assert!(out.pending() <= 100);
    }
}
