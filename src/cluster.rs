//! What replicas share: one Redis (`[cluster] redis_url`), reached through one
//! auto-reconnecting connection made at start-up. A replica starts and serves whether or not
//! Redis answers; a Redis restart or a dropped connection is recovered on the next command,
//! and a watcher pings Redis every second so that `/healthz` tells its state.
//!
//! Other modules send their commands through [`Redis::run`], which bounds them by
//! `redis_timeout` and reports faults once (a loud, rate-limited log line and a metric).
//! While the watcher finds Redis down, commands fail at once instead of each waiting out
//! `redis_timeout`; the watcher's next successful ping (within a second) ends that.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use redis::{
    RedisError,
    aio::{ConnectionManager, ConnectionManagerConfig},
};

use crate::{
    config::{ClusterSettings, OnRedisError},
    telemetry,
};

/// How often the watcher pings Redis for `/healthz`.
const PING_INTERVAL: Duration = Duration::from_secs(1);
/// At most one warning about Redis faults per this long; the others are counted in it.
const WARN_INTERVAL: Duration = Duration::from_secs(10);
/// How long one connection attempt may take (the command's own timeout is shorter).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The cluster a replica belongs to: none without `redis_url` (every limit is in process).
#[derive(Clone, Default)]
pub struct Cluster {
    redis: Option<Redis>,
}

/// The shared Redis: a cheap handle (clone it freely) to one multiplexed connection.
#[derive(Clone)]
pub struct Redis {
    connection: ConnectionManager,
    settings: Arc<ClusterSettings>,
    faults: Arc<Faults>,
}

/// Whether Redis answered lately, and when a fault was last logged.
struct Faults {
    /// [`UNKNOWN`] until the first ping, then [`UP`] or [`DOWN`] as the watcher found it
    /// (a command that succeeds also says [`UP`], one that lost its connection [`DOWN`]).
    state: AtomicU8,
    started: Instant,
    /// Milliseconds after `started` of the last warning (0: none yet).
    last_warned_ms: AtomicU64,
    unreported: AtomicU64,
}

const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

/// What `/healthz` says of Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisState {
    Ok,
    Unreachable,
}

impl RedisState {
    pub fn as_str(self) -> &'static str {
        match self {
            RedisState::Ok => "ok",
            RedisState::Unreachable => "unreachable",
        }
    }
}

/// A Redis command that failed or did not answer within `redis_timeout`.
#[derive(Debug)]
pub struct RedisFault(String);

impl std::fmt::Display for RedisFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Cluster {
    /// Connects lazily to `settings.redis_url` and starts the watcher; must run inside the
    /// Tokio runtime. Fails only on a URL the client cannot use (e.g. a TLS setup error).
    pub fn start(settings: &ClusterSettings) -> Result<Cluster, String> {
        let Some(url) = &settings.redis_url else {
            return Ok(Cluster::default());
        };
        let redacted = settings.redacted_url().unwrap_or_default();
        let client = redis::Client::open(url.as_str())
            .map_err(|err| format!("`[cluster] redis_url` ({redacted}): {}", err.category()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(CONNECT_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let connection = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|err| format!("`[cluster] redis_url` ({redacted}): {}", err.category()))?;
        let redis = Redis {
            connection,
            settings: Arc::new(settings.clone()),
            faults: Arc::new(Faults {
                state: AtomicU8::new(UNKNOWN),
                started: Instant::now(),
                last_warned_ms: AtomicU64::new(0),
                unreported: AtomicU64::new(0),
            }),
        };
        tracing::info!(
            redis = %redacted,
            on_redis_error = ?settings.on_redis_error,
            "per-key limits are shared through Redis"
        );
        tokio::spawn(redis.clone().watch());
        Ok(Cluster { redis: Some(redis) })
    }

    /// The shared Redis, if this replica has one.
    pub fn redis(&self) -> Option<&Redis> {
        self.redis.as_ref()
    }

    /// Redis's state for `/healthz`; `None` without Redis.
    pub fn redis_state(&self) -> Option<RedisState> {
        self.redis.as_ref().map(|redis| {
            if redis.faults.state.load(Ordering::Relaxed) == UP {
                RedisState::Ok
            } else {
                RedisState::Unreachable
            }
        })
    }
}

impl Redis {
    /// A handle on the shared connection (multiplexed: clones share one socket).
    pub fn connection(&self) -> ConnectionManager {
        self.connection.clone()
    }

    pub fn settings(&self) -> &ClusterSettings {
        &self.settings
    }

    /// A key under the configured prefix, `{owner}` hash-tagged so that everything of one
    /// owner (an API key, a stream) lives on one Redis Cluster slot and a script may touch it.
    pub fn key(&self, owner: &str, what: &str) -> String {
        format!("{}:{{{owner}}}:{what}", self.settings.key_prefix)
    }

    /// Runs `command` within `redis_timeout`, or fails at once while Redis is known to be
    /// down. A failure is logged (at most once per ten seconds), counted in
    /// `modelgate_redis_errors_total{operation}` and returned.
    pub async fn run<T>(
        &self,
        operation: &'static str,
        command: impl Future<Output = Result<T, RedisError>>,
    ) -> Result<T, RedisFault> {
        let fault = if self.faults.state.load(Ordering::Relaxed) == DOWN {
            RedisFault("Redis is unreachable (it failed its last ping)".into())
        } else {
            match tokio::time::timeout(self.settings.redis_timeout, command).await {
                Ok(Ok(value)) => {
                    self.faults.state.store(UP, Ordering::Relaxed);
                    return Ok(value);
                }
                Ok(Err(err)) => {
                    // A lost connection is news worth failing the next commands fast for;
                    // a slow answer is not (the watcher decides).
                    if err.is_io_error() || err.is_connection_dropped() {
                        self.faults.state.store(DOWN, Ordering::Relaxed);
                    }
                    RedisFault(describe(&err))
                }
                Err(_) => RedisFault(format!(
                    "no answer within redis_timeout ({:?})",
                    self.settings.redis_timeout
                )),
            }
        };
        metrics::counter!(telemetry::REDIS_ERRORS, "operation" => operation).increment(1);
        self.warn(operation, &fault);
        Err(fault)
    }

    /// What a request meets when Redis failed it.
    pub fn on_error(&self) -> OnRedisError {
        self.settings.on_redis_error
    }

    fn warn(&self, operation: &'static str, fault: &RedisFault) {
        let now_ms = (self.faults.started.elapsed().as_millis() as u64).max(1);
        let last = self.faults.last_warned_ms.load(Ordering::Relaxed);
        let due = last == 0 || now_ms.saturating_sub(last) >= WARN_INTERVAL.as_millis() as u64;
        if due
            && self
                .faults
                .last_warned_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let unreported = self.faults.unreported.swap(0, Ordering::Relaxed);
            let consequence = match self.settings.on_redis_error {
                OnRedisError::Allow => {
                    "requests go on WITHOUT the shared per-key limits (on_redis_error = \"allow\")"
                }
                OnRedisError::Deny => {
                    "requests that need the shared limits are refused with 503 (on_redis_error = \"deny\")"
                }
            };
            tracing::warn!(
                operation,
                unreported_faults = unreported,
                "REDIS UNAVAILABLE: {fault}; {consequence}"
            );
        } else {
            self.faults.unreported.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Pings Redis every second: keeps `/healthz` true, and reconnects an idle replica.
    async fn watch(self) {
        let mut interval = tokio::time::interval(PING_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut was_reachable = None;
        loop {
            interval.tick().await;
            let mut connection = self.connection.clone();
            let ping = tokio::time::timeout(
                CONNECT_TIMEOUT,
                redis::cmd("PING").query_async::<()>(&mut connection),
            )
            .await;
            let reachable = matches!(ping, Ok(Ok(())));
            let state = if reachable { UP } else { DOWN };
            self.faults.state.store(state, Ordering::Relaxed);
            if was_reachable != Some(reachable) {
                match (reachable, &ping) {
                    (true, _) => tracing::info!("Redis is reachable"),
                    (false, Ok(Err(err))) => {
                        tracing::warn!("REDIS UNREACHABLE: {}", describe(err))
                    }
                    (false, _) => tracing::warn!("REDIS UNREACHABLE: no answer to PING"),
                }
                was_reachable = Some(reachable);
            }
        }
    }
}

/// A Redis error in words that never hold the URL (nor so its password).
fn describe(err: &RedisError) -> String {
    match err.detail() {
        Some(detail) => format!("{}: {detail}", err.category()),
        None => err.to_string(),
    }
}
