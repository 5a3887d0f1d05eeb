//! Every per-key limit behind one [`Limiter`], kept in this process or, with
//! `[cluster] redis_url`, in Redis for all replicas together. Both backends follow the same
//! rules, checked and taken in one atomic step so that a refused request costs nothing:
//!
//! - `concurrent_streams`: a lease per upstream call, released when it ends. In Redis a
//!   lease has a TTL (`lease_ttl`) renewed while the call lives, so a replica that dies
//!   frees its leases within the TTL.
//! - `requests_per_minute` and `tokens_per_minute`: GCRA (the generic cell rate algorithm,
//!   a leaky bucket that holds one minute's worth). A request is let in while its key has
//!   room; it then reserves its `max_tokens`, and when it ends the reservation is settled to
//!   the tokens really used (input and output), which may run the bucket into a debt that
//!   later requests wait out.
//! - `tokens_per_day` and `tokens_per_month` (UTC calendar windows): a request is let in only
//!   if its `max_tokens` fits in what is left, reserved and settled the same way; over it is
//!   429 `budget_exhausted` with `Retry-After` = the time to the window's reset.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use redis::Script;
use tokio_util::task::TaskTracker;

use crate::{
    cluster::{Cluster, Redis},
    config::{ApiKeySpec, KeyLimits, OnRedisError},
    error::{Error, Result},
};

/// The window of `requests_per_minute` and `tokens_per_minute`.
const MINUTE: Duration = Duration::from_secs(60);
/// What a key at its `concurrent_streams` is told to wait.
const CONCURRENCY_RETRY_AFTER_SECS: u64 = 1;

pub enum Limiter {
    InProcess(InProcess),
    Redis(Shared),
}

/// A key's limits, for one request.
pub struct KeyRef<'a> {
    pub id: &'a str,
    pub limits: &'a KeyLimits,
}

/// What the request holds of its key's limits while it lives: a stream lease and a token
/// reservation. [`Admission::record`] tells the tokens really used; dropping it settles the
/// reservation to them (nothing if never recorded: a refused or failed request pays nothing)
/// and releases the lease.
pub struct Admission {
    reserved: u64,
    used: AtomicU64,
    held: Held,
}

enum Held {
    /// No limits to hold: no key, a key without limits, or Redis unavailable and allowed.
    Nothing,
    InProcess {
        state: Arc<Mutex<KeyState>>,
        lease: bool,
    },
    Redis(Box<RedisHold>),
}

impl Limiter {
    /// `work`: where releases and settlements run, so that a graceful shutdown waits for them.
    pub fn new(keys: &[ApiKeySpec], cluster: &Cluster, work: &TaskTracker) -> Limiter {
        match cluster.redis() {
            Some(redis) => Limiter::Redis(Shared {
                redis: redis.clone(),
                work: work.clone(),
            }),
            None => Limiter::InProcess(InProcess::new(keys)),
        }
    }

    /// Takes one request, a stream lease and `reserve` tokens from `key`'s limits, or none
    /// of them when one is over.
    pub async fn admit(&self, key: Option<KeyRef<'_>>, reserve: u32) -> Result<Admission> {
        let Some(key) = key.filter(|key| has_limits(key.limits)) else {
            return Ok(Admission::nothing());
        };
        let reserve = u64::from(reserve);
        match self {
            Limiter::InProcess(limiter) => limiter.admit(key, reserve),
            Limiter::Redis(shared) => shared.admit(key, reserve).await,
        }
    }
}

fn has_limits(limits: &KeyLimits) -> bool {
    limits.requests_per_minute.is_some()
        || limits.tokens_per_minute.is_some()
        || limits.concurrent_streams.is_some()
        || limits.tokens_per_day.is_some()
        || limits.tokens_per_month.is_some()
}

impl Admission {
    fn nothing() -> Admission {
        Admission {
            reserved: 0,
            used: AtomicU64::new(0),
            held: Held::Nothing,
        }
    }

    /// The tokens the request really used, settled against the reservation when dropped.
    pub fn record(&self, tokens: u64) {
        self.used.store(tokens, Ordering::Relaxed);
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let used = self.used.load(Ordering::Relaxed);
        match &mut self.held {
            Held::Nothing => {}
            Held::InProcess { state, lease } => {
                let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
                state.settle(self.reserved, used, *lease);
            }
            Held::Redis(hold) => hold.finish(self.reserved, used),
        }
    }
}

/// Why a request was refused, and the message its key's owner reads.
fn refusal(id: &str, limits: &KeyLimits, over: Over, reserve: u64) -> Error {
    match over {
        Over::Streams => Error::RateLimited {
            message: format!(
                "API key `{id}` already has {} upstream calls in flight (concurrent_streams); wait for one to end",
                limits.concurrent_streams.map_or(0, |n| n.get())
            ),
            retry_after_secs: CONCURRENCY_RETRY_AFTER_SECS,
        },
        Over::Requests(wait) => Error::RateLimited {
            message: format!("API key `{id}` is over its requests per minute"),
            retry_after_secs: whole_seconds(wait),
        },
        Over::Tokens(wait) => Error::RateLimited {
            message: format!("API key `{id}` has used its tokens per minute"),
            retry_after_secs: whole_seconds(wait),
        },
        Over::Budget(window, used) => {
            let limit = match window {
                BudgetWindow::Day => limits.tokens_per_day,
                BudgetWindow::Month => limits.tokens_per_month,
            }
            .map_or(0, |n| n.get());
            let left = limit.saturating_sub(used);
            Error::BudgetExhausted {
                message: format!(
                    "API key `{id}` has {left} of its {limit} {} left and this request may use {reserve} (its max_tokens); the budget resets at {}",
                    window.setting(),
                    window.reset_text()
                ),
                retry_after_secs: whole_seconds(window.until_reset()),
            }
        }
    }
}

fn whole_seconds(wait: Duration) -> u64 {
    wait.as_secs_f64().ceil().max(1.0) as u64
}

/// The limit a request is over.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Over {
    Streams,
    Requests(Duration),
    Tokens(Duration),
    /// The window, and the tokens already used or reserved in it.
    Budget(BudgetWindow, u64),
}

/// A UTC calendar window of a token budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BudgetWindow {
    Day,
    Month,
}

impl BudgetWindow {
    fn setting(self) -> &'static str {
        match self {
            BudgetWindow::Day => "tokens_per_day",
            BudgetWindow::Month => "tokens_per_month",
        }
    }

    /// The current window's name, e.g. `2026-11-28` or `2026-11`.
    fn current(self) -> String {
        let today = utc_date(SystemTime::now());
        match self {
            BudgetWindow::Day => today,
            BudgetWindow::Month => today[..7].to_owned(),
        }
    }

    /// When the current window ends.
    fn reset(self) -> SystemTime {
        let now = SystemTime::now();
        let today = utc_date(now);
        let start_of = |date: &str| {
            humantime::parse_rfc3339(&format!("{date}T00:00:00Z")).unwrap_or(now + MINUTE)
        };
        match self {
            BudgetWindow::Day => start_of(&today) + Duration::from_secs(86_400),
            BudgetWindow::Month => {
                // The 28th is in this month; four weeks on is in the next one.
                let late_this_month = start_of(&format!("{}-28", &today[..7]));
                let next_month = utc_date(late_this_month + Duration::from_secs(4 * 86_400));
                start_of(&format!("{}-01", &next_month[..7]))
            }
        }
    }

    fn until_reset(self) -> Duration {
        self.reset()
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
    }

    fn reset_text(self) -> String {
        humantime::format_rfc3339_seconds(self.reset()).to_string()
    }
}

/// `YYYY-MM-DD` of `time`, in UTC.
fn utc_date(time: SystemTime) -> String {
    let mut text = humantime::format_rfc3339_seconds(time).to_string();
    text.truncate(10);
    text
}

// ---- In process ----

/// Every key's limits in this process alone.
pub struct InProcess {
    keys: HashMap<String, Arc<Mutex<KeyState>>>,
}

#[derive(Default)]
struct KeyState {
    streams: usize,
    requests: Gcra,
    tokens: Gcra,
    day: Budget,
    month: Budget,
    limits: KeyLimits,
}

impl InProcess {
    fn new(keys: &[ApiKeySpec]) -> InProcess {
        InProcess {
            keys: keys
                .iter()
                .map(|key| {
                    let state = KeyState {
                        limits: key.limits,
                        ..KeyState::default()
                    };
                    (key.id.clone(), Arc::new(Mutex::new(state)))
                })
                .collect(),
        }
    }

    fn admit(&self, key: KeyRef<'_>, reserve: u64) -> Result<Admission> {
        let Some(state) = self.keys.get(key.id) else {
            return Ok(Admission::nothing());
        };
        let lease = key.limits.concurrent_streams.is_some();
        state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .admit(reserve, Instant::now())
            .map_err(|over| refusal(key.id, key.limits, over, reserve))?;
        Ok(Admission {
            reserved: reserve,
            used: AtomicU64::new(0),
            held: Held::InProcess {
                state: state.clone(),
                lease,
            },
        })
    }
}

impl KeyState {
    /// Checks every limit, then takes from each: all or nothing.
    fn admit(&mut self, reserve: u64, now: Instant) -> Result<(), Over> {
        let limits = self.limits;
        if let Some(max) = limits.concurrent_streams
            && self.streams >= max.get()
        {
            return Err(Over::Streams);
        }
        if let Some(rate) = limits.requests_per_minute {
            self.requests
                .check(rate.get(), now)
                .map_err(Over::Requests)?;
        }
        if let Some(rate) = limits.tokens_per_minute {
            self.tokens.check(rate.get(), now).map_err(Over::Tokens)?;
        }
        let budgets = [
            (BudgetWindow::Day, limits.tokens_per_day),
            (BudgetWindow::Month, limits.tokens_per_month),
        ];
        for (window, limit) in budgets {
            if let Some(limit) = limit {
                let used = self.budget(window).check(window, limit.get(), reserve);
                used.map_err(|used| Over::Budget(window, used))?;
            }
        }
        // Every limit has room: take from each.
        if limits.concurrent_streams.is_some() {
            self.streams += 1;
        }
        if let Some(rate) = limits.requests_per_minute {
            self.requests.take(rate.get(), 1.0, now);
        }
        if let Some(rate) = limits.tokens_per_minute {
            self.tokens.take(rate.get(), reserve as f64, now);
        }
        for (window, limit) in budgets {
            if limit.is_some() {
                self.budget(window).used += reserve;
            }
        }
        Ok(())
    }

    /// Settles a reservation to the tokens used, and releases the lease.
    fn settle(&mut self, reserved: u64, used: u64, lease: bool) {
        if lease {
            self.streams = self.streams.saturating_sub(1);
        }
        let delta = used as f64 - reserved as f64;
        if let Some(rate) = self.limits.tokens_per_minute {
            self.tokens.take(rate.get(), delta, Instant::now());
        }
        let budgets = [
            (BudgetWindow::Day, self.limits.tokens_per_day),
            (BudgetWindow::Month, self.limits.tokens_per_month),
        ];
        for (window, limit) in budgets {
            if limit.is_some() {
                let budget = self.budget(window);
                budget.used = (budget.used + used).saturating_sub(reserved);
            }
        }
    }

    fn budget(&mut self, window: BudgetWindow) -> &mut Budget {
        match window {
            BudgetWindow::Day => &mut self.day,
            BudgetWindow::Month => &mut self.month,
        }
    }
}

/// GCRA state: the theoretical arrival time of the next cell.
#[derive(Default)]
struct Gcra {
    tat: Option<Instant>,
}

impl Gcra {
    /// Whether one more cell fits in a minute's worth at `per_minute`; if not, how long to wait.
    fn check(&self, per_minute: u32, now: Instant) -> Result<(), Duration> {
        let interval = MINUTE / per_minute;
        let tat = self.tat.map_or(now, |tat| tat.max(now));
        let ahead = tat + interval - now;
        if ahead > MINUTE {
            Err(ahead - MINUTE)
        } else {
            Ok(())
        }
    }

    /// Moves the arrival time by `cells` (fewer than zero: a refund).
    fn take(&mut self, per_minute: u32, cells: f64, now: Instant) {
        let interval = MINUTE.as_secs_f64() / f64::from(per_minute);
        let tat = self.tat.map_or(now, |tat| tat.max(now));
        let moved = cells * interval;
        self.tat = Some(if moved >= 0.0 {
            Duration::try_from_secs_f64(moved)
                .ok()
                .and_then(|moved| tat.checked_add(moved))
                .unwrap_or(tat)
        } else {
            Duration::try_from_secs_f64(-moved)
                .ok()
                .and_then(|moved| tat.checked_sub(moved))
                .unwrap_or(now)
        });
    }
}

/// Tokens used or reserved in the current calendar window.
#[derive(Default)]
struct Budget {
    window: String,
    used: u64,
}

impl Budget {
    /// Whether `reserve` more fits under `limit`; if not, what is used already.
    fn check(&mut self, window: BudgetWindow, limit: u64, reserve: u64) -> Result<(), u64> {
        let current = window.current();
        if self.window != current {
            self.window = current;
            self.used = 0;
        }
        if self.used + reserve > limit {
            Err(self.used)
        } else {
            Ok(())
        }
    }
}

// ---- Redis ----

/// Every key's limits in Redis, shared by the replicas. Time is Redis's own (`TIME`), so
/// replicas' clocks need not agree.
pub struct Shared {
    redis: Redis,
    work: TaskTracker,
}

/// The Redis keys of one API key's limits.
#[derive(Clone)]
struct KeyNames {
    leases: String,
    requests: String,
    tokens: String,
    day: String,
    month: String,
}

struct RedisHold {
    redis: Redis,
    work: TaskTracker,
    names: KeyNames,
    limits: KeyLimits,
    /// Empty without `concurrent_streams`.
    lease: String,
    renewal: Option<tokio::task::JoinHandle<()>>,
}

/// Checks every limit and takes from each, or from none. Returns `{over, wait_ms_or_used}`.
const ADMIT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local lease_ttl, streams = tonumber(ARGV[2]), tonumber(ARGV[3])
local rpm, tpm, reserve = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local per_day, per_month = tonumber(ARGV[7]), tonumber(ARGV[8])
if streams > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) >= streams then return {'streams', 0} end
end
local function tat_of(key, rate)
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  return tat, 60000 / rate
end
local rtat, rstep, ttat, tstep
if rpm > 0 then
  rtat, rstep = tat_of(KEYS[2], rpm)
  if rtat + rstep - now > 60000 then return {'requests', math.ceil(rtat + rstep - now - 60000)} end
end
if tpm > 0 then
  ttat, tstep = tat_of(KEYS[3], tpm)
  if ttat + tstep - now > 60000 then return {'tokens', math.ceil(ttat + tstep - now - 60000)} end
end
local day_used = tonumber(redis.call('GET', KEYS[4])) or 0
if per_day > 0 and day_used + reserve > per_day then return {'day', day_used} end
local month_used = tonumber(redis.call('GET', KEYS[5])) or 0
if per_month > 0 and month_used + reserve > per_month then return {'month', month_used} end
if streams > 0 then
  redis.call('ZADD', KEYS[1], now + lease_ttl, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], lease_ttl)
end
if rpm > 0 then
  rtat = rtat + rstep
  redis.call('SET', KEYS[2], string.format('%.3f', rtat), 'PX', math.ceil(rtat - now))
end
if tpm > 0 then
  ttat = ttat + reserve * tstep
  redis.call('SET', KEYS[3], string.format('%.3f', ttat), 'PX', math.ceil(ttat - now))
end
if per_day > 0 then
  redis.call('INCRBY', KEYS[4], reserve)
  redis.call('EXPIRE', KEYS[4], ARGV[9])
end
if per_month > 0 then
  redis.call('INCRBY', KEYS[5], reserve)
  redis.call('EXPIRE', KEYS[5], ARGV[10])
end
return {'ok', 0}
"#;

/// Keeps a lease alive (and puts it back if Redis lost it, e.g. in a restart).
const RENEW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"#;

/// Releases a lease and settles a reservation by `delta` tokens (used − reserved).
const FINISH: &str = r#"
if ARGV[1] ~= '' then redis.call('ZREM', KEYS[1], ARGV[1]) end
local delta, tpm = tonumber(ARGV[2]), tonumber(ARGV[3])
if delta == 0 then return 1 end
if tpm > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
  local tat = tonumber(redis.call('GET', KEYS[2])) or now
  if tat < now then tat = now end
  tat = tat + delta * 60000 / tpm
  if tat > now then
    redis.call('SET', KEYS[2], string.format('%.3f', tat), 'PX', math.ceil(tat - now))
  else
    redis.call('DEL', KEYS[2])
  end
end
for i, ttl in ipairs({ARGV[4], ARGV[5]}) do
  if tonumber(ttl) > 0 then
    local used = redis.call('INCRBY', KEYS[2 + i], delta)
    if used < 0 then redis.call('SET', KEYS[2 + i], 0) end
    redis.call('EXPIRE', KEYS[2 + i], ttl)
  end
end
return 1
"#;

fn scripts() -> &'static (Script, Script, Script) {
    static SCRIPTS: std::sync::OnceLock<(Script, Script, Script)> = std::sync::OnceLock::new();
    SCRIPTS.get_or_init(|| (Script::new(ADMIT), Script::new(RENEW), Script::new(FINISH)))
}

/// Seconds a budget window's key is kept: to its reset, and a day more for late settles.
fn window_ttl(window: BudgetWindow, limit: Option<std::num::NonZeroU64>) -> u64 {
    limit.map_or(0, |_| window.until_reset().as_secs() + 86_400)
}

impl Shared {
    async fn admit(&self, key: KeyRef<'_>, reserve: u64) -> Result<Admission> {
        let names = KeyNames {
            leases: self.redis.key(key.id, "leases"),
            requests: self.redis.key(key.id, "rpm"),
            tokens: self.redis.key(key.id, "tpm"),
            day: self
                .redis
                .key(key.id, &format!("day:{}", BudgetWindow::Day.current())),
            month: self
                .redis
                .key(key.id, &format!("month:{}", BudgetWindow::Month.current())),
        };
        let limits = *key.limits;
        let lease = if limits.concurrent_streams.is_some() {
            uuid::Uuid::new_v4().simple().to_string()
        } else {
            String::new()
        };
        let lease_ttl = self.redis.settings().lease_ttl;
        let mut connection = self.redis.connection();
        let mut invocation = scripts().0.prepare_invoke();
        invocation
            .key(&names.leases)
            .key(&names.requests)
            .key(&names.tokens)
            .key(&names.day)
            .key(&names.month)
            .arg(&lease)
            .arg(lease_ttl.as_millis() as u64)
            .arg(limits.concurrent_streams.map_or(0, |n| n.get()))
            .arg(limits.requests_per_minute.map_or(0, |n| n.get()))
            .arg(limits.tokens_per_minute.map_or(0, |n| n.get()))
            .arg(reserve)
            .arg(limits.tokens_per_day.map_or(0, |n| n.get()))
            .arg(limits.tokens_per_month.map_or(0, |n| n.get()))
            .arg(window_ttl(BudgetWindow::Day, limits.tokens_per_day))
            .arg(window_ttl(BudgetWindow::Month, limits.tokens_per_month));
        let answer = self
            .redis
            .run(
                "admit",
                invocation.invoke_async::<(String, u64)>(&mut connection),
            )
            .await;
        let (verdict, figure) = match answer {
            Ok(answer) => answer,
            Err(fault) => {
                return match self.redis.on_error() {
                    OnRedisError::Allow => Ok(Admission::nothing()),
                    OnRedisError::Deny => Err(Error::LimitsUnavailable(format!(
                        "the shared per-key limits cannot be checked ({fault}); retry shortly"
                    ))),
                };
            }
        };
        let over = match verdict.as_str() {
            "ok" => None,
            "streams" => Some(Over::Streams),
            "requests" => Some(Over::Requests(Duration::from_millis(figure))),
            "tokens" => Some(Over::Tokens(Duration::from_millis(figure))),
            "day" => Some(Over::Budget(BudgetWindow::Day, figure)),
            _ => Some(Over::Budget(BudgetWindow::Month, figure)),
        };
        if let Some(over) = over {
            return Err(refusal(key.id, key.limits, over, reserve));
        }
        let renewal = (!lease.is_empty()).then(|| {
            tokio::spawn(renew(
                self.redis.clone(),
                names.leases.clone(),
                lease.clone(),
            ))
        });
        Ok(Admission {
            reserved: reserve,
            used: AtomicU64::new(0),
            held: Held::Redis(Box::new(RedisHold {
                redis: self.redis.clone(),
                work: self.work.clone(),
                names,
                limits,
                lease,
                renewal,
            })),
        })
    }
}

/// Renews a lease three times per TTL until the call ends (the task is aborted).
async fn renew(redis: Redis, leases: String, lease: String) {
    let ttl = redis.settings().lease_ttl;
    let mut interval = tokio::time::interval(ttl / 3);
    interval.tick().await;
    loop {
        interval.tick().await;
        let mut connection = redis.connection();
        let mut invocation = scripts().1.prepare_invoke();
        invocation
            .key(&leases)
            .arg(&lease)
            .arg(ttl.as_millis() as u64);
        // A fault is logged and counted by `run`; the next tick tries again.
        let _ = redis
            .run("renew", invocation.invoke_async::<()>(&mut connection))
            .await;
    }
}

impl RedisHold {
    /// Stops the renewal, then releases the lease and settles, off the request's path (but
    /// tracked: a graceful shutdown releases its leases instead of leaving them to expire).
    fn finish(&mut self, reserved: u64, used: u64) {
        if let Some(renewal) = self.renewal.take() {
            renewal.abort();
        }
        let delta = used as i64 - reserved as i64;
        let has_tokens = self.limits.tokens_per_minute.is_some()
            || self.limits.tokens_per_day.is_some()
            || self.limits.tokens_per_month.is_some();
        if self.lease.is_empty() && (delta == 0 || !has_tokens) {
            return;
        }
        let redis = self.redis.clone();
        let names = self.names.clone();
        let lease = std::mem::take(&mut self.lease);
        let limits = self.limits;
        self.work.spawn(async move {
            let mut connection = redis.connection();
            let mut invocation = scripts().2.prepare_invoke();
            invocation
                .key(&names.leases)
                .key(&names.tokens)
                .key(&names.day)
                .key(&names.month)
                .arg(&lease)
                .arg(delta)
                .arg(limits.tokens_per_minute.map_or(0, |n| n.get()))
                .arg(window_ttl(BudgetWindow::Day, limits.tokens_per_day))
                .arg(window_ttl(BudgetWindow::Month, limits.tokens_per_month));
            let _ = redis
                .run("settle", invocation.invoke_async::<()>(&mut connection))
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};

    use super::*;

    fn limiter(limits: KeyLimits) -> Limiter {
        Limiter::InProcess(InProcess::new(&[ApiKeySpec {
            id: "team".into(),
            sha256: [0; 32],
            limits,
        }]))
    }

    fn admit(limiter: &Limiter, limits: &KeyLimits, reserve: u32) -> Result<Admission> {
        let key = KeyRef { id: "team", limits };
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(limiter.admit(Some(key), reserve))
    }

    #[test]
    fn requests_per_minute_are_limited_with_a_retry_after() {
        let limits = KeyLimits {
            requests_per_minute: NonZeroU32::new(2),
            ..KeyLimits::default()
        };
        let limiter = limiter(limits);
        for _ in 0..2 {
            drop(admit(&limiter, &limits, 10).unwrap());
        }
        let refused = admit(&limiter, &limits, 10).err().unwrap();
        assert_eq!(refused.code(), "rate_limited");
        assert!((1..=30).contains(&refused.retry_after().unwrap()));
    }

    #[test]
    fn a_reservation_holds_tokens_until_it_is_settled_to_what_was_used() {
        let limits = KeyLimits {
            tokens_per_minute: NonZeroU32::new(100),
            ..KeyLimits::default()
        };
        let limiter = limiter(limits);
        let first = admit(&limiter, &limits, 500).unwrap();
        let refused = admit(&limiter, &limits, 1).err().unwrap();
        assert_eq!(refused.code(), "rate_limited", "the reservation is held");
        first.record(10);
        drop(first);
        let second = admit(&limiter, &limits, 500).unwrap();
        second.record(250);
        drop(second);
        assert_eq!(
            admit(&limiter, &limits, 1).err().unwrap().code(),
            "rate_limited",
            "used tokens run into a debt"
        );
    }

    #[test]
    fn a_budget_lets_in_only_what_fits_and_answers_budget_exhausted_until_the_reset() {
        let limits = KeyLimits {
            tokens_per_day: NonZeroU64::new(100),
            ..KeyLimits::default()
        };
        let limiter = limiter(limits);
        let first = admit(&limiter, &limits, 60).unwrap();
        let refused = admit(&limiter, &limits, 60).err().unwrap();
        assert_eq!(refused.code(), "budget_exhausted");
        assert!(refused.retry_after().unwrap() <= 86_400);
        assert!(
            refused
                .to_string()
                .contains("40 of its 100 tokens_per_day left")
        );
        first.record(30);
        drop(first);
        drop(admit(&limiter, &limits, 70).unwrap());
        let unrecorded = admit(&limiter, &limits, 70);
        assert!(
            unrecorded.is_ok(),
            "a request that used nothing (failed before the upstream answered) pays nothing"
        );
        assert_eq!(
            admit(&limiter, &limits, 1).err().unwrap().code(),
            "budget_exhausted"
        );
    }

    #[test]
    fn concurrent_streams_are_leases_released_on_drop_and_a_refusal_takes_nothing() {
        let limits = KeyLimits {
            concurrent_streams: NonZeroUsize::new(1),
            requests_per_minute: NonZeroU32::new(2),
            ..KeyLimits::default()
        };
        let limiter = limiter(limits);
        let held = admit(&limiter, &limits, 1).unwrap();
        for _ in 0..3 {
            let refused = admit(&limiter, &limits, 1).err().unwrap();
            assert!(refused.to_string().contains("in flight"), "{refused}");
        }
        drop(held);
        drop(admit(&limiter, &limits, 1).unwrap());
        assert!(
            admit(&limiter, &limits, 1)
                .err()
                .unwrap()
                .to_string()
                .contains("requests per minute")
        );
    }

    #[test]
    fn the_month_resets_on_the_first() {
        let reset = humantime::format_rfc3339_seconds(BudgetWindow::Month.reset()).to_string();
        assert!(reset.ends_with("-01T00:00:00Z"), "{reset}");
        assert!(BudgetWindow::Month.until_reset() <= Duration::from_secs(31 * 86_400));
        let day = humantime::format_rfc3339_seconds(BudgetWindow::Day.reset()).to_string();
        assert!(day.ends_with("T00:00:00Z"), "{day}");
    }
}
