//! L2: the shared tier (Redis through fred), written only through a version fence.
//!
//! Policy: each item is a hash `{ver, kind, data}` under `{prefix}:c1:item:{id}` (`c1`
//! is the encoding version: a rolling deploy that changes the encoding never reads the
//! other version's bytes) with a TTL of `cache.l2_ttl`. `kind` is `v` (value), `n`
//! (absent) or `t` (tombstone: deleted at `ver`).
//!
//! Every command fails fast when the connection is down and times out after
//! `redis.command_timeout`; a circuit breaker skips Redis altogether while it keeps
//! failing. A Redis error is a miss, never a failed request.
//!
//! Trust: after a failed write (a fence that could not be applied), or when the
//! invalidation channel is lost, L2 may hold an older value than PostgreSQL for some key.
//! Reads then skip L2 until a recovery pass of the outbox relay has fenced every write
//! that could have been missed (the `service::relay` module, and `docs/cache-protocol.md`,
//! "Recovering after a Redis outage", say why that is enough). Each distrust starts a new
//! *epoch*; a recovery trusts L2 again only if no distrust came after it began.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fred::prelude::*;
use fred::types::scripts::Script;
use tiergate_config::RedisSettings;

use super::breaker::{self, Breaker};

/// Writes `{ver, kind, data}` only if the key holds an older version, or a tombstone of
/// the same version being replaced by what was read after the delete. Without it, a
/// reader that loaded v1 could overwrite the v2 a writer just fenced (race R1 in
/// `docs/cache-protocol.md`). A key with no version takes a writer's entry (`ARGV[5]`
/// empty), but a reader's only with the lease it took at its miss (`ARGV[5]`): the lease
/// is gone when a writer fenced in between or Redis evicted the key, fence and all, and
/// then the reader may hold an older version than PostgreSQL. Returns 1 when written, 0
/// when fenced off.
const FENCE_LUA: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'ver', 'kind', 'lease')
local ver = tonumber(ARGV[1])
if cur[1] then
  local cur_ver = tonumber(cur[1])
  if cur_ver > ver then return 0 end
  if cur_ver == ver and not (cur[2] == 't' and ARGV[2] ~= 't') then return 0 end
elseif ARGV[5] ~= '' and cur[3] ~= ARGV[5] then
  return 0
end
redis.call('HDEL', KEYS[1], 'lease')
redis.call('HSET', KEYS[1], 'ver', ARGV[1], 'kind', ARGV[2], 'data', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
";

/// A reader's lease on a missing key: created with only `lease` and a short TTL, so its
/// fill can land unless a writer or an eviction came first. Returns 1 when taken.
const LEASE_LUA: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'lease', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
";

/// Longer than a miss takes to read PostgreSQL (`statement_timeout` defaults to 5 s); a
/// lease that expires first only costs that one fill.
const LEASE_TTL: Duration = Duration::from_secs(10);

/// The lowest bit of [`L2`]'s trust state: reads may use L2.
const TRUSTED: u64 = 1;

/// Who writes through the fence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filler {
    /// A writer or the outbox relay: PostgreSQL committed this version.
    Writer,
    /// A reader filling what it read, with the lease it took at its miss, if any.
    Reader(Option<u64>),
}

/// What L2 holds for an id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    Value(Bytes),
    Absent,
    Tombstone,
}

impl Stored {
    fn code(&self) -> &'static str {
        match self {
            Self::Value(_) => "v",
            Self::Absent => "n",
            Self::Tombstone => "t",
        }
    }
}

/// The shared tier. Cheap to clone: clones share one multiplexed connection.
#[derive(Clone)]
pub struct L2 {
    client: Client,
    prefix: String,
    ttl: Duration,
    fence: Script,
    lease: Script,
    /// Applied to every command: fail at once while disconnected, one attempt, a short
    /// timeout. The next tier answers instead.
    options: Options,
    breaker: Arc<Breaker>,
    /// Whether reads may use L2, and the distrust epoch (see the module docs): the epoch
    /// in the high bits, "trusted" in the lowest, so that "trust again unless distrusted
    /// since" is one compare-and-swap.
    trust: Arc<AtomicU64>,
    /// The invalidation channel, `{prefix}:c1:invalidations`.
    channel: String,
}

/// An invalidation: `id` changed to `version` in PostgreSQL, written by `origin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalidation {
    pub id: i64,
    pub version: i64,
    pub origin: u64,
    /// When it was published, in microseconds since the Unix epoch (for the latency
    /// histogram; meaningful across hosts only as far as their clocks agree).
    pub sent_at_micros: u64,
}

impl Invalidation {
    /// `"{id} {version} {origin:x} {sent_at_micros}"`: small, and parsed without serde.
    fn encode(&self) -> String {
        format!(
            "{} {} {:x} {}",
            self.id, self.version, self.origin, self.sent_at_micros
        )
    }

    /// The message, or `None` when it is not one of ours.
    pub fn decode(text: &str) -> Option<Self> {
        let mut parts = text.split(' ');
        let invalidation = Self {
            id: parts.next()?.parse().ok()?,
            version: parts.next()?.parse().ok()?,
            origin: u64::from_str_radix(parts.next()?, 16).ok()?,
            sent_at_micros: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(invalidation)
    }
}

/// Microseconds since the Unix epoch, now.
pub fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

impl std::fmt::Debug for L2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("L2")
            .field("prefix", &self.prefix)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// `redis.url` does not parse, or `redis.ca_file` cannot be used. The message names the
/// setting, never the URL.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {reason}")]
pub struct InvalidRedisUrl {
    setting: &'static str,
    reason: String,
}

impl InvalidRedisUrl {
    fn url() -> Self {
        Self {
            setting: "redis.url",
            reason: "not a valid Redis URL".to_owned(),
        }
    }
}

impl L2 {
    /// Builds the client and starts connecting in the background; never waits for Redis.
    /// Lost connections are re-established with exponential backoff (100 ms to 5 s).
    ///
    /// # Errors
    /// [`InvalidRedisUrl`] when the URL does not parse.
    pub fn connect(settings: &RedisSettings, ttl: Duration) -> Result<Self, InvalidRedisUrl> {
        let l2 = Self::new(settings, ttl)?;
        l2.start_connecting();
        Ok(l2)
    }

    /// Builds the client without connecting it (see [`Self::start_connecting`]).
    ///
    /// # Errors
    /// [`InvalidRedisUrl`] when the URL does not parse.
    pub fn new(settings: &RedisSettings, ttl: Duration) -> Result<Self, InvalidRedisUrl> {
        let mut config =
            Config::from_url(settings.url.expose()).map_err(|_| InvalidRedisUrl::url())?;
        // `rediss://` turns TLS on with the system's roots; a CA file replaces them (a
        // private CA, or ElastiCache's in-transit encryption behind a custom one). The name
        // checked is the URL's host.
        if config.tls.is_some() {
            if let Some(ca_file) = settings.ca_file.as_deref() {
                let tls =
                    crate::tls::client_config(Some(ca_file), crate::tls::Verify::ChainAndName)
                        .map_err(|reason| InvalidRedisUrl {
                            setting: "redis.ca_file",
                            reason,
                        })?;
                config.tls = Some(fred::types::config::TlsConfig::from(tls));
            }
        }
        // Retry the first connection too, instead of failing start-up.
        config.fail_fast = false;
        let client = Builder::from_config(config)
            .with_connection_config(|c| {
                c.connection_timeout = settings.connect_timeout;
                c.internal_command_timeout = settings.connect_timeout;
            })
            .with_performance_config(|p| p.default_command_timeout = settings.command_timeout)
            // At most a second between attempts: a Redis back from an outage is used within
            // a second, and an attempt against one still down costs one refused connect.
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 1_000, 2))
            .build()
            .map_err(|_| InvalidRedisUrl::url())?;
        let options = Options {
            fail_fast: true,
            max_attempts: Some(1),
            timeout: Some(settings.command_timeout),
            ..Options::default()
        };
        Ok(Self {
            client,
            prefix: settings.key_prefix.clone(),
            ttl,
            fence: Script::from_lua(FENCE_LUA),
            lease: Script::from_lua(LEASE_LUA),
            options,
            breaker: Arc::new(Breaker::new(
                settings.breaker_failures,
                settings.breaker_open,
            )),
            trust: Arc::new(AtomicU64::new(TRUSTED)),
            channel: format!("{}:c1:invalidations", settings.key_prefix),
        })
    }

    /// The invalidation channel.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// Whether reads may use L2 now.
    pub fn is_trusted(&self) -> bool {
        self.trust.load(Ordering::Acquire) & TRUSTED != 0
    }

    /// Marks L2 as possibly behind PostgreSQL for some key (a fence failed, or
    /// invalidations may have been lost), and starts a new distrust epoch: a recovery
    /// that began before this cannot trust L2 again.
    pub fn distrust(&self) {
        let before = self
            .trust
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |state| {
                Some(((state >> 1) + 1) << 1)
            })
            .unwrap_or(TRUSTED);
        if before & TRUSTED != 0 {
            tracing::warn!("Redis may have missed writes: reads skip it until they are repaired.");
        }
    }

    /// The current distrust epoch, read by a recovery when it begins.
    pub fn distrust_epoch(&self) -> u64 {
        self.trust.load(Ordering::Acquire) >> 1
    }

    /// Trusts L2 again, unless it was distrusted after `epoch` was read; returns whether
    /// it is trusted now.
    pub fn trust_unless_distrusted_since(&self, epoch: u64) -> bool {
        let untrusted = epoch << 1;
        match self.trust.compare_exchange(
            untrusted,
            untrusted | TRUSTED,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => {
                tracing::info!("Missed writes repaired: reads use Redis again.");
                true
            }
            Err(now) => now & TRUSTED != 0,
        }
    }

    /// The breaker's state, for the gauge and `/health`.
    pub fn breaker_state(&self) -> breaker::State {
        self.breaker.state()
    }

    /// Runs one Redis call through the breaker.
    async fn guarded<T>(&self, call: impl Future<Output = Result<T, Error>>) -> Result<T, Error> {
        if !self.breaker.allow() {
            return Err(Error::new(ErrorKind::Unknown, "circuit breaker open"));
        }
        match call.await {
            Ok(value) => {
                self.breaker.success();
                Ok(value)
            }
            Err(error) => {
                self.breaker.failure();
                Err(error)
            }
        }
    }

    /// The Redis key of an item.
    pub fn key(&self, id: i64) -> String {
        format!("{}:c1:item:{id}", self.prefix)
    }

    /// What L2 holds for `id` and at which version; `None` on a miss.
    ///
    /// # Errors
    /// Redis unreachable, slow, or holding a malformed entry.
    pub async fn get(&self, id: i64) -> Result<Option<(i64, Stored)>, Error> {
        let client = self.client.with_options(&self.options);
        let (ver, kind, data): (Option<i64>, Option<String>, Option<Bytes>) = self
            .guarded(client.hmget(self.key(id), vec!["ver", "kind", "data"]))
            .await?;
        let Some(ver) = ver else { return Ok(None) };
        let stored = match (kind.as_deref(), data) {
            (Some("v"), Some(data)) => Stored::Value(data),
            (Some("n"), _) => Stored::Absent,
            (Some("t"), _) => Stored::Tombstone,
            _ => return Err(Error::new(ErrorKind::Parse, "malformed L2 entry")),
        };
        Ok(Some((ver, stored)))
    }

    /// Writes `stored` at `version` through the fence; `ttl` defaults to the tier's TTL,
    /// jittered ±10 %. Returns whether it was written (`false`: a newer version was
    /// already there). A failure makes L2 untrusted (see the module docs).
    ///
    /// # Errors
    /// Redis unreachable or slow.
    pub async fn fill(
        &self,
        id: i64,
        version: i64,
        stored: &Stored,
        ttl: Option<Duration>,
        by: Filler,
    ) -> Result<bool, Error> {
        let result = self.guarded(self.fence(id, version, stored, ttl, by)).await;
        if result.is_err() {
            self.distrust();
        }
        result
    }

    /// Takes a lease on the missing key `id` for the reader about to read PostgreSQL;
    /// `None` when the key exists (another reader's lease, or a writer came first).
    ///
    /// # Errors
    /// Redis unreachable or slow.
    pub async fn lease(&self, id: i64) -> Result<Option<u64>, Error> {
        // Never 0: a reader without a lease sends "0", which no lease matches.
        let token = fastrand::u64(1..);
        let ttl_ms = i64::try_from(LEASE_TTL.as_millis()).unwrap_or(i64::MAX);
        let args: Vec<Value> = vec![token.to_string().into(), ttl_ms.into()];
        let taken: i64 = self
            .guarded(self.eval(&self.lease, LEASE_LUA, id, args))
            .await?;
        Ok((taken == 1).then_some(token))
    }

    async fn fence(
        &self,
        id: i64,
        version: i64,
        stored: &Stored,
        ttl: Option<Duration>,
        by: Filler,
    ) -> Result<bool, Error> {
        let data = match stored {
            Stored::Value(data) => data.clone(),
            Stored::Absent | Stored::Tombstone => Bytes::new(),
        };
        let ttl = ttl.unwrap_or(self.ttl).mul_f64(0.9 + fastrand::f64() * 0.2);
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
        let lease = match by {
            Filler::Writer => String::new(),
            Filler::Reader(lease) => lease.unwrap_or(0).to_string(),
        };
        let args: Vec<Value> = vec![
            version.into(),
            stored.code().into(),
            Value::Bytes(data),
            ttl_ms.into(),
            lease.into(),
        ];
        let written: i64 = self.eval(&self.fence, FENCE_LUA, id, args).await?;
        Ok(written == 1)
    }

    /// Fences a tombstone at each `(id, version)`, as a writer: the relay repairing many
    /// writes at once. The fences are sent together (fred writes concurrent commands to
    /// the connection without waiting for each answer), so a thousand cost about one round
    /// trip. Each is the same fence as [`Self::fill`]'s: a newer version already in L2 is
    /// left alone, and a failure makes L2 untrusted.
    ///
    /// # Errors
    /// Redis unreachable or slow for any one of them.
    pub async fn fence_tombstones(&self, fences: &[(i64, i64)]) -> Result<(), Error> {
        // Once for all: after a restart each fence would otherwise load it itself.
        if let Err(error) = self.guarded(self.load_script(FENCE_LUA)).await {
            self.distrust();
            return Err(error);
        }
        let fills = fences
            .iter()
            .map(|&(id, version)| self.fill(id, version, &Stored::Tombstone, None, Filler::Writer));
        for fenced in futures_util::future::join_all(fills).await {
            fenced?;
        }
        Ok(())
    }

    /// Runs `script` on the key of `id`.
    async fn eval(
        &self,
        script: &Script,
        lua: &'static str,
        id: i64,
        args: Vec<Value>,
    ) -> Result<i64, Error> {
        let client = self.client.with_options(&self.options);
        match client
            .evalsha(script.sha1().clone(), self.key(id), args.clone())
            .await
        {
            Err(e) if e.details().starts_with("NOSCRIPT") => {
                // First use on this server (or it restarted): load the script, then retry.
                self.load_script(lua).await?;
                client
                    .evalsha(script.sha1().clone(), self.key(id), args)
                    .await
            }
            other => other,
        }
    }

    /// Loads `lua` on the server. A cluster keeps scripts per node: it is loaded on every
    /// primary, or the key's node may still not know it.
    async fn load_script(&self, lua: &'static str) -> Result<(), Error> {
        let client = self.client.with_options(&self.options);
        if self.client.is_clustered() {
            client.script_load_cluster(lua).await
        } else {
            client.script_load(lua).await
        }
    }

    /// A new subscriber connection to the same server, for the invalidation bus: pub/sub
    /// needs a connection of its own. Its broadcast channel is large (fred's default of
    /// 32 messages drops under a burst of writes), and an unresponsive connection is
    /// detected within about 2 s and replaced.
    ///
    /// # Errors
    /// fred refuses the configuration (practically never: it is the L2 client's).
    pub fn subscriber(&self) -> Result<fred::clients::SubscriberClient, Error> {
        let mut connection = self.client.connection_config().clone();
        connection.unresponsive.max_timeout = Some(Duration::from_secs(2));
        connection.unresponsive.interval = Duration::from_millis(500);
        let mut performance = self.client.perf_config();
        performance.broadcast_channel_capacity = 16_384;
        let mut builder = Builder::from_config(self.client.client_config());
        builder
            .set_connection_config(connection)
            .set_performance_config(performance);
        if let Some(policy) = self.client.client_reconnect_policy() {
            builder.set_policy(policy);
        }
        builder.build_subscriber_client()
    }

    /// Publishes an invalidation on the channel. In cluster mode it is a sharded publish
    /// (`SPUBLISH`): a plain `PUBLISH` is copied to every node of the cluster.
    ///
    /// # Errors
    /// Redis unreachable or slow.
    pub async fn publish(&self, invalidation: &Invalidation) -> Result<(), Error> {
        self.publish_on(&self.channel, invalidation.encode()).await
    }

    /// Publishes `message` on `channel` as [`Self::publish`] publishes an invalidation.
    ///
    /// # Errors
    /// Redis unreachable or slow.
    pub async fn publish_on(&self, channel: &str, message: String) -> Result<(), Error> {
        let client = self.client.with_options(&self.options);
        let _receivers: i64 = if self.client.is_clustered() {
            self.guarded(client.spublish(channel, message)).await?
        } else {
            self.guarded(client.publish(channel, message)).await?
        };
        Ok(())
    }

    /// Publishes many invalidations, sent together as [`Self::fence_tombstones`] sends its
    /// fences.
    ///
    /// # Errors
    /// Redis unreachable or slow for any one of them.
    pub async fn publish_all(&self, invalidations: &[Invalidation]) -> Result<(), Error> {
        let published = invalidations.iter().map(|i| self.publish(i));
        for result in futures_util::future::join_all(published).await {
            result?;
        }
        Ok(())
    }

    /// Tells of every (re)connection to Redis, the first one included: the relay then
    /// starts a recovery at once instead of at its next tick.
    pub fn reconnections(&self) -> tokio::sync::broadcast::Receiver<fred::types::config::Server> {
        self.client.reconnect_rx()
    }

    /// One `PING` past the breaker: the relay's check that Redis answers again. An answer
    /// closes the breaker, so requests use Redis at once rather than after
    /// `redis.breaker_open`.
    pub async fn probe(&self) -> bool {
        let answered = self.ping().await.is_ok();
        if answered {
            self.breaker.success();
        }
        answered
    }

    /// Waits until the first connection is up, at most `timeout`: start-up gives Redis a
    /// moment so the first requests can use it, but never waits on it for long.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.client.wait_for_connect())
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// One `PING` round trip.
    ///
    /// # Errors
    /// Redis unreachable or slow.
    pub async fn ping(&self) -> Result<Duration, Error> {
        let started = Instant::now();
        let _: String = self.client.with_options(&self.options).ping(None).await?;
        Ok(started.elapsed())
    }

    /// Closes the connection (on shutdown).
    pub async fn quit(&self) {
        let _ = self.client.quit().await;
    }

    /// Starts connecting in the background, reconnecting with backoff after that.
    pub fn start_connecting(&self) {
        self.client.connect();
    }
}
