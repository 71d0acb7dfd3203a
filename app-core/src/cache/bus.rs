//! The invalidation bus: every write is published on a Redis channel, and every instance
//! drops its L1 copy of what a peer changed.
//!
//! The subscriber is a connection of its own (pub/sub takes a connection over) with its
//! own receive loop. Messages can be lost — while the connection is down, or when this
//! loop falls behind fred's broadcast channel — and then L1 may hold what a peer has
//! since changed. So: while the channel is down, L1 is *degraded* (new entries live
//! `cache.degraded_l1_ttl`); when it is back (subscribed again) or after a lag, L1 is
//! flushed. Redis' own client-side-caching rules say the same. Losing the channel also
//! makes L2 untrusted: the Redis that dropped it may have dropped writers' fences too,
//! and the outbox relay repairs those before reads use L2 again.
//!
//! The same subscriber carries the fleet channel (`{prefix}:c1:fleet`, see the `fleet`
//! module): its messages go to the task's [`Fleet`], which is told to check PostgreSQL
//! whenever the channel comes back, since changes may have been missed meanwhile.

use fred::clients::SubscriberClient;
use fred::prelude::*;
use metrics::{Counter, Histogram};
use tokio::sync::broadcast::error::RecvError;

use super::l1::L1;
use super::l2::{Invalidation, L2, unix_micros};
use crate::fleet::{Fleet, fleet_channel};

/// Runs the bus until the app is dropped (`alive` resolves).
pub struct Bus {
    subscriber: SubscriberClient,
    channel: String,
    fleet_channel: String,
    origin: u64,
    l1: L1,
    l2: L2,
    fleet: Fleet,
    metrics: BusMetrics,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("channel", &self.channel)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl Bus {
    /// A bus for the instance `origin` (its own messages are skipped) over `l1`, that
    /// hands fleet changes to `fleet`.
    ///
    /// # Errors
    /// fred refuses the subscriber configuration.
    pub fn new(l2: &L2, l1: L1, origin: u64, fleet: Fleet) -> Result<Self, Error> {
        Ok(Self {
            subscriber: l2.subscriber()?,
            channel: l2.channel().to_owned(),
            fleet_channel: fleet_channel(l2.channel()),
            origin,
            l1,
            l2: l2.clone(),
            fleet,
            metrics: BusMetrics::new(),
        })
    }

    /// The subscriber, to close it on shutdown (which ends [`Bus::run`]).
    pub fn subscriber(&self) -> SubscriberClient {
        self.subscriber.clone()
    }

    /// Connects and applies invalidations until the subscriber is closed.
    pub async fn run(self) {
        // Subscribe to the events before connecting, so the first connection is seen.
        let mut messages = self.subscriber.message_rx();
        let mut reconnects = self.subscriber.reconnect_rx();
        let mut errors = self.subscriber.error_rx();
        let mut unresponsive = self.subscriber.unresponsive_rx();
        let _connection = self.subscriber.connect();
        self.l1.set_degraded(true);

        loop {
            tokio::select! {
                message = messages.recv() => match message {
                    Ok(message) => self.apply(&message).await,
                    Err(RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "Invalidation receiver fell behind; flushing L1.");
                        self.flush("lagged");
                    }
                    Err(RecvError::Closed) => return,
                },
                event = reconnects.recv() => match event {
                    // (Re)connected: subscribe, then flush what may have changed meanwhile.
                    // The order matters: a message published between a flush and the
                    // subscription would be lost.
                    Ok(_) | Err(RecvError::Lagged(_)) => self.resubscribe().await,
                    Err(RecvError::Closed) => return,
                },
                event = errors.recv() => match event {
                    Ok((error, _)) => {
                        tracing::warn!(%error, "Invalidation channel lost; L1 entries live briefly until it is back.");
                        self.channel_lost();
                    }
                    Err(RecvError::Lagged(_)) => self.channel_lost(),
                    Err(RecvError::Closed) => return,
                },
                event = unresponsive.recv() => match event {
                    Ok(_) | Err(RecvError::Lagged(_)) => {
                        tracing::warn!("Invalidation channel unresponsive; reconnecting.");
                        self.channel_lost();
                    }
                    Err(RecvError::Closed) => return,
                },
            }
        }
    }

    async fn resubscribe(&self) {
        // Sharded pub/sub in cluster mode, to match the publisher (see `L2::publish`).
        // One channel per command: in a cluster the two live in different slots.
        let mut subscribed = Ok(());
        for channel in [self.channel.as_str(), self.fleet_channel.as_str()] {
            subscribed = if self.subscriber.is_clustered() {
                self.subscriber.ssubscribe(channel).await
            } else {
                self.subscriber.subscribe(channel).await
            };
            if subscribed.is_err() {
                break;
            }
        }
        match subscribed {
            Ok(()) => {
                self.fleet.repair();
                self.flush("reconnected");
                self.l1.set_degraded(false);
                tracing::info!(channel = %self.channel, "Invalidation channel subscribed.");
            }
            Err(error) => {
                // The connection went again; the next reconnect retries.
                tracing::warn!(%error, "Subscribing to the invalidation channel failed.");
                self.l1.set_degraded(true);
            }
        }
    }

    /// Invalidations may be lost until the channel is back, and fences may have been.
    fn channel_lost(&self) {
        self.l1.set_degraded(true);
        self.l2.distrust();
    }

    async fn apply(&self, message: &fred::types::Message) {
        if *message.channel == *self.fleet_channel {
            if let Some(text) = message.value.as_str() {
                self.fleet.receive(&text);
            }
            return;
        }
        self.metrics.received.increment(1);
        let Some(invalidation) = message
            .value
            .as_str()
            .and_then(|text| Invalidation::decode(&text))
        else {
            tracing::debug!("Ignored a malformed invalidation message.");
            return;
        };
        if invalidation.origin == self.origin {
            return;
        }
        self.l1
            .invalidate_version(invalidation.id, invalidation.version)
            .await;
        self.metrics.applied.increment(1);
        let latency = unix_micros().saturating_sub(invalidation.sent_at_micros);
        #[allow(clippy::cast_precision_loss)]
        // microseconds fit an f64 exactly far beyond any latency
        self.metrics.latency.record(latency as f64 / 1e6);
    }

    fn flush(&self, cause: &'static str) {
        self.l1.flush();
        metrics::counter!("tiergate_cache_l1_flushes_total", "cause" => cause).increment(1);
    }
}

#[derive(Clone)]
struct BusMetrics {
    received: Counter,
    applied: Counter,
    latency: Histogram,
}

impl BusMetrics {
    fn new() -> Self {
        metrics::describe_counter!(
            "tiergate_cache_invalidations_received_total",
            "Invalidations received."
        );
        metrics::describe_counter!(
            "tiergate_cache_invalidations_applied_total",
            "Invalidations from peers applied to L1."
        );
        metrics::describe_histogram!(
            "tiergate_cache_invalidation_latency_seconds",
            metrics::Unit::Seconds,
            "From publish by the writer to the drop of the L1 copy here."
        );
        metrics::describe_counter!(
            "tiergate_cache_l1_flushes_total",
            "Whole-L1 flushes by cause."
        );
        Self {
            received: metrics::counter!("tiergate_cache_invalidations_received_total"),
            applied: metrics::counter!("tiergate_cache_invalidations_applied_total"),
            latency: metrics::histogram!("tiergate_cache_invalidation_latency_seconds"),
        }
    }
}
