//! What client connections and cluster routes share: a connection's
//! [`Link`] (its bounded outbound queue, the writer task that drains it, its
//! kill switch and traffic counts), its [`ReadBuffer`], and why it ended.
//!
//! Both kinds of connection are served the same way: a reader task parses
//! and handles a whole read batch, queueing frames on the links of whoever
//! should get them and collecting those links in a [`WakeList`]; after the
//! batch each of those writers is woken once and writes whatever its
//! [`Outbound`] holds, vectored, with a deadline per write. Nothing here
//! knows which protocol the bytes are: clients (`crate::client`) and routes
//! (`crate::cluster`) each add their own on top.
//!
//! Invariant: a link is closed exactly once (`cut_off` records the first
//! reason and wins), after which nothing more is queued on it.

mod outbound;
mod read_buffer;

pub use outbound::{Outbound, PushError, Pushed, SHARE_MIN};
pub(crate) use read_buffer::ReadBuffer;

use std::collections::VecDeque;
use std::fmt;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

/// Most iovecs handed to one vectored write.
const MAX_IOVECS: usize = 64;

/// Why a connection ended, in nats-server's words (as in its `/connz`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    ClientClosed,
    ServerShutdown,
    ReadError,
    WriteError,
    ParseError,
    MaxPayloadExceeded,
    MaxControlLineExceeded,
    StaleConnection,
    SlowConsumerPendingBytes,
    SlowConsumerWriteDeadline,
    AuthenticationTimeout,
    AuthenticationViolation,
    /// A route closed because another one to the same peer is kept.
    DuplicateRoute,
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CloseReason::ClientClosed => "Client Closed",
            CloseReason::ServerShutdown => "Server Shutdown",
            CloseReason::ReadError => "Read Error",
            CloseReason::WriteError => "Write Error",
            CloseReason::ParseError => "Parse Error",
            CloseReason::MaxPayloadExceeded => "Maximum Message Payload Exceeded",
            CloseReason::MaxControlLineExceeded => "Maximum Control Line Exceeded",
            CloseReason::StaleConnection => "Stale Connection",
            CloseReason::SlowConsumerPendingBytes => "Slow Consumer (Pending Bytes)",
            CloseReason::SlowConsumerWriteDeadline => "Slow Consumer (Write Deadline)",
            CloseReason::AuthenticationTimeout => "Authentication Timeout",
            CloseReason::AuthenticationViolation => "Authentication Failure",
            CloseReason::DuplicateRoute => "Duplicate Route",
        })
    }
}

/// Traffic of one connection or, summed, of the server, in nats-server's
/// terms: messages (and their payload bytes) received from it and sent to
/// it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub in_msgs: u64,
    pub in_bytes: u64,
    pub out_msgs: u64,
    pub out_bytes: u64,
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, other: Counts) {
        self.in_msgs += other.in_msgs;
        self.in_bytes += other.in_bytes;
        self.out_msgs += other.out_msgs;
        self.out_bytes += other.out_bytes;
    }
}

/// The part of a connection other tasks may touch: its outbound queue, the
/// kill switch that cuts it off, and its traffic counts.
pub struct Link {
    pub id: u64,
    pub addr: SocketAddr,
    pub outbound: Outbound,
    /// When the connection was accepted.
    pub started: std::time::SystemTime,
    /// Messages and payload bytes received, added once per read batch by
    /// the reader (no atomic per message).
    in_msgs: AtomicU64,
    in_bytes: AtomicU64,
    /// Cuts the connection off without flushing (slow consumer, write error).
    kill: CancellationToken,
    /// Asks the reader to end the connection as shutdown does, flushing
    /// what is queued: how lame duck mode closes clients one by one.
    close: CancellationToken,
    /// Why it was cut off, for the reader's log line.
    kill_reason: Mutex<Option<CloseReason>>,
    /// The name the other side gave (a client's CONNECT `name`), for logs.
    pub(crate) name: Mutex<String>,
}

impl Link {
    pub(crate) fn new(id: u64, addr: SocketAddr, max_pending: usize) -> Link {
        Link {
            id,
            addr,
            outbound: Outbound::new(max_pending),
            started: std::time::SystemTime::now(),
            in_msgs: AtomicU64::new(0),
            in_bytes: AtomicU64::new(0),
            kill: CancellationToken::new(),
            close: CancellationToken::new(),
            kill_reason: Mutex::new(None),
            name: Mutex::new(String::new()),
        }
    }

    /// Settles a push: a writer to wake goes on `wakes`; a full queue cuts
    /// the connection off as a slow consumer. Returns whether it queued.
    pub(crate) fn queued(
        self: &Arc<Self>,
        pushed: Result<Pushed, PushError>,
        wakes: &mut WakeList,
    ) -> bool {
        match pushed {
            Ok(Pushed { wake }) => {
                if wake {
                    wakes.0.push(Arc::clone(self));
                }
                true
            }
            Err(PushError::SlowConsumer) => {
                self.cut_off(CloseReason::SlowConsumerPendingBytes);
                false
            }
            Err(PushError::Closed) => false,
        }
    }

    /// Queues protocol bytes and wakes the writer at once (for lines sent
    /// outside a read batch).
    pub(crate) fn outbound_bytes(self: &Arc<Self>, bytes: &[u8]) {
        let mut wakes = WakeList::default();
        let pushed = self.outbound.push_bytes(bytes);
        self.queued(pushed, &mut wakes);
        wakes.wake_all();
    }

    /// Resolves when the connection has been cut off, with the reason.
    pub(crate) async fn killed(&self) -> CloseReason {
        self.kill.cancelled().await;
        self.kill_reason.lock().unwrap_or(CloseReason::WriteError)
    }

    /// Resolves when [`Link::close`] was called.
    pub(crate) async fn close_requested(&self) {
        self.close.cancelled().await
    }

    /// Closes the outbound queue and lets the writer flush what is queued
    /// within `deadline`; cuts it off after that.
    pub(crate) async fn finish(
        &self,
        mut write_task: tokio::task::JoinHandle<()>,
        deadline: std::time::Duration,
    ) {
        self.outbound.close();
        if timeout(deadline, &mut write_task).await.is_err() {
            self.kill.cancel();
            let _ = write_task.await;
        }
    }

    /// Ends the connection as shutdown does: what is queued is flushed
    /// (within `write_deadline`), then it closes.
    pub(crate) fn close(&self) {
        self.close.cancel();
    }

    /// Closes the connection now, dropping what is queued.
    pub(crate) fn cut_off(&self, reason: CloseReason) {
        {
            let mut slot = self.kill_reason.lock();
            if slot.is_some() {
                return;
            }
            *slot = Some(reason);
        }
        if matches!(
            reason,
            CloseReason::SlowConsumerPendingBytes | CloseReason::SlowConsumerWriteDeadline
        ) {
            tracing::warn!(
                "{self} - Slow Consumer Detected: {reason}, pending {} bytes",
                self.outbound.pending()
            );
        }
        self.outbound.close();
        self.kill.cancel();
    }

    /// The name the other side gave (empty if none).
    pub fn name(&self) -> String {
        self.name.lock().clone()
    }

    /// This connection's traffic so far.
    pub fn counts(&self) -> Counts {
        let (out_msgs, out_bytes) = self.outbound.delivered();
        Counts {
            in_msgs: self.in_msgs.load(Ordering::Relaxed),
            in_bytes: self.in_bytes.load(Ordering::Relaxed),
            out_msgs,
            out_bytes,
        }
    }

    /// Adds a read batch's worth of received messages (and resets the
    /// reader's tally).
    pub(crate) fn add_received(&self, tally: &mut (u64, u64)) {
        if tally.0 > 0 {
            self.in_msgs.fetch_add(tally.0, Ordering::Relaxed);
            self.in_bytes.fetch_add(tally.1, Ordering::Relaxed);
            *tally = (0, 0);
        }
    }
}

impl fmt::Display for Link {
    /// nats-server's log prefix: `addr - cid:N - "name"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} - cid:{}", self.addr, self.id)?;
        let name = self.name.lock();
        if !name.is_empty() {
            write!(f, " - \"{name}\"")?;
        }
        Ok(())
    }
}

/// Writers to wake after a read batch, each once.
#[derive(Default)]
pub struct WakeList(Vec<Arc<Link>>);

impl WakeList {
    pub fn wake_all(&mut self) {
        for link in self.0.drain(..) {
            link.outbound.wake();
        }
    }
}

/// The writer task: takes whatever is queued and writes it, until the queue
/// is closed and empty or the client is cut off.
pub(crate) async fn write_loop<W: AsyncWrite + Unpin>(
    link: Arc<Link>,
    mut writer: W,
    deadline: std::time::Duration,
) {
    let mut chunks = VecDeque::new();
    let mut written = 0;
    loop {
        if !link.outbound.take(written, &mut chunks) {
            break;
        }
        written = 0;
        if chunks.is_empty() {
            tokio::select! {
                _ = link.outbound.notified() => continue,
                _ = link.kill.cancelled() => return,
            }
        }
        while !chunks.is_empty() {
            let result = tokio::select! {
                r = timeout(deadline, write_some(&mut writer, &mut chunks)) => r,
                _ = link.kill.cancelled() => return,
            };
            match result {
                Ok(Ok(n)) => written += n,
                Ok(Err(e)) => {
                    tracing::debug!("{link} - write error: {e}");
                    link.cut_off(CloseReason::WriteError);
                    return;
                }
                Err(_) => {
                    link.cut_off(CloseReason::SlowConsumerWriteDeadline);
                    return;
                }
            }
        }
    }
    let _ = timeout(deadline, writer.shutdown()).await;
}

/// One read into `buf`, of at most `limit` bytes if given.
pub(crate) async fn read_some<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    limit: Option<usize>,
) -> std::io::Result<usize> {
    match limit {
        Some(limit) => reader.take(limit as u64).read_buf(buf).await,
        None => reader.read_buf(buf).await,
    }
}

/// One vectored write of the front of `chunks`; drops what was written.
async fn write_some<W: AsyncWrite + Unpin>(
    writer: &mut W,
    chunks: &mut VecDeque<Bytes>,
) -> std::io::Result<usize> {
    // The iovec array is built on the stack at each poll, not kept in the
    // future: held across an `.await` it would add 1 KB to every
    // connection's writer task, idle ones included.
    let written = std::future::poll_fn(|cx| {
        let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
        let n = chunks
            .iter()
            .zip(slices.iter_mut())
            .map(|(chunk, slice)| *slice = IoSlice::new(chunk))
            .count();
        std::pin::Pin::new(&mut *writer).poll_write_vectored(cx, &slices[..n])
    })
    .await?;
    if written == 0 {
        return Err(std::io::ErrorKind::WriteZero.into());
    }
    let mut left = written;
    while left > 0 {
        let Some(front) = chunks.front_mut() else {
            break;
        };
        if front.len() <= left {
            left -= front.len();
            chunks.pop_front();
        } else {
            front.advance(left);
            left = 0;
        }
    }
    Ok(written)
}
