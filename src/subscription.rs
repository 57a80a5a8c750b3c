//! What a subscription is, and how one message is handed to it.
//!
//! The sublist stores `Arc<Subscription>`s; routing asks each matching one to
//! [`Subscription::deliver`], which hands the message to the [`Subscriber`]
//! behind it. The core knows subscribers only by that trait: a client
//! connection (its outbound queue gets the frame), a handler inside the
//! server (the durable-stream API, a stream capturing its subjects, acks),
//! or a peer node standing for remote interest ([`Subscriber::peer`]), to
//! which routing forwards one message per peer instead of delivering.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use crate::connection::WakeList;
use crate::protocol::Message;

/// Who receives what a subscription matches.
///
/// `deliver` runs on the publisher's task, in the middle of routing its
/// read batch, so it must not block or wait: it queues the message (on an
/// outbound queue whose writer goes on `wakes`, or on a bounded queue of
/// its own task) and returns whether it took it.
pub trait Subscriber: Send + Sync {
    /// Takes `msg`, matched by this subscriber's subscription `sid`.
    fn deliver(&self, sid: &[u8], msg: &Message, wakes: &mut WakeList) -> bool;

    /// Whether a message on `subject` must not reach it; asked only for
    /// subscriptions made with [`Subscription::with_deny_filter`].
    fn denies(&self, _subject: &[u8]) -> bool {
        false
    }

    /// The id of the connection it is, if it is one, so that a publisher
    /// that asked not to get its own messages (`echo: false`) does not.
    fn connection_id(&self) -> Option<u64> {
        None
    }

    /// Subscription `sid` is gone from the sublist (auto-unsubscribe or
    /// removal): forget what it keeps for it.
    fn forget(&self, _sid: &[u8]) {}

    /// A peer node whose clients (or streams) want what this subscription
    /// matches: routing forwards to it itself, once per message and peer.
    fn peer(&self) -> Option<&dyn Peer> {
        None
    }
}

/// A peer node messages are forwarded to.
pub trait Peer: Send + Sync {
    /// Queues `msg` for the peer, naming the queue groups it was chosen for
    /// there; whether it was queued.
    fn forward(&self, msg: &Message, queues: &[&[u8]], wakes: &mut WakeList) -> bool;
}

/// How far news of a subscription travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The whole cluster: peers are told (`RS+`) and forward matching
    /// messages here.
    Cluster,
    /// This node only: for handlers every node has its own of (the stream
    /// API), which must not answer requests made on other nodes.
    Node,
}

/// One subscription. Equality is identity (`id`), so two subscriptions with
/// the same subject stay distinct in the sublist.
///
/// Its subject, queue and sid live in one small allocation of its own, never
/// in the buffer the SUB (or `RS+`) was read from: a subscription lasts for
/// the connection's lifetime, and a 20-byte subject that is a slice of a
/// 64 KiB read buffer would keep all of it alive.
pub struct Subscription {
    id: u64,
    pub subject: Bytes,
    pub queue: Option<Bytes>,
    pub sid: Bytes,
    pub subscriber: Arc<dyn Subscriber>,
    /// Auto-unsubscribe after this many deliveries in total (0: never),
    /// nats-server's `UNSUB sid max` semantics.
    max: AtomicU64,
    delivered: AtomicU64,
    /// The client's permissions deny some subjects this wildcard matches:
    /// each delivery asks them first. Unset for all other subscriptions, so
    /// they pay nothing.
    deny_filter: bool,
    pub scope: Scope,
    /// A queue member's weight when routing picks a member cluster-wide: 1
    /// for a local member (itself), a peer's member count (its `RS+`) for a
    /// route's. Changes while the subscription is in the sublist, hence
    /// atomic.
    queue_weight: AtomicU32,
}

impl PartialEq for Subscription {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

/// What became of one delivery attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Queued for the subscriber.
    Delivered,
    /// Queued, and that was the last one its auto-unsubscribe allowed: the
    /// caller must remove the subscription.
    DeliveredLast,
    /// Not delivered (auto-unsubscribe limit already reached, or the
    /// subscriber is gone or was cut off).
    Skipped,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl Subscription {
    /// A subscription to `subject` (in queue group `queue`) with the
    /// subscriber's `sid`; all three are copied (see the type's docs).
    pub fn new(
        subject: &[u8],
        queue: Option<&[u8]>,
        sid: &[u8],
        subscriber: Arc<dyn Subscriber>,
    ) -> Self {
        // One allocation for the three: `sid` then `subject` then `queue`.
        let queue_len = queue.map_or(0, <[u8]>::len);
        let mut own = Vec::with_capacity(sid.len() + subject.len() + queue_len);
        own.extend_from_slice(sid);
        own.extend_from_slice(subject);
        own.extend_from_slice(queue.unwrap_or_default());
        let own = Bytes::from(own);
        let subject_end = sid.len() + subject.len();
        Subscription {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            subject: own.slice(sid.len()..subject_end),
            queue: queue.map(|_| own.slice(subject_end..)),
            sid: own.slice(..sid.len()),
            subscriber,
            max: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            deny_filter: false,
            scope: Scope::Cluster,
            queue_weight: AtomicU32::new(1),
        }
    }

    /// This queue member's weight (see `queue_weight`).
    pub fn queue_weight(&self) -> u32 {
        self.queue_weight.load(Ordering::Relaxed)
    }

    /// Sets a route's weight to the members its peer announced; at least 1,
    /// since an announced group has a member.
    pub fn set_queue_weight(&self, members: u32) {
        self.queue_weight.store(members.max(1), Ordering::Relaxed);
    }

    /// Keeps news of this subscription on this node.
    pub fn node_only(mut self) -> Self {
        self.scope = Scope::Node;
        self
    }

    /// The peer node behind this subscription, if it stands for one.
    pub fn peer(&self) -> Option<&dyn Peer> {
        self.subscriber.peer()
    }

    /// Whether peers must hear of this subscription: a local one (a client's
    /// or a handler's) that is not [`Scope::Node`].
    pub fn propagates(&self) -> bool {
        self.scope == Scope::Cluster && self.peer().is_none()
    }

    /// Marks a client subscription that overlaps subjects its client may
    /// not receive (see [`crate::auth::SubscribeCheck::Filtered`]).
    pub fn with_deny_filter(mut self) -> Self {
        self.deny_filter = true;
        self
    }

    /// Sets the auto-unsubscribe limit. Returns `true` if the subscription
    /// has already had that many messages and must go now.
    pub fn set_max(&self, max: u64) -> bool {
        self.max.store(max, Ordering::Relaxed);
        max > 0 && self.delivered.load(Ordering::Relaxed) >= max
    }

    /// Hands `msg` to the subscriber. Wake-ups are collected in `wakes` so a
    /// whole read batch costs each writer one wake.
    pub fn deliver(&self, msg: &Message, wakes: &mut WakeList) -> Delivery {
        // Checked before counting: a filtered message is not one of `max`.
        if self.deny_filter && self.subscriber.denies(msg.subject()) {
            return Delivery::Skipped;
        }
        let n = self.delivered.fetch_add(1, Ordering::Relaxed) + 1;
        let max = self.max.load(Ordering::Relaxed);
        if max > 0 && n > max {
            return Delivery::Skipped;
        }
        let last = max > 0 && n == max;
        let queued = self.subscriber.deliver(&self.sid, msg, wakes);
        match (queued, last) {
            (false, _) => Delivery::Skipped,
            (true, false) => Delivery::Delivered,
            (true, true) => Delivery::DeliveredLast,
        }
    }
}
