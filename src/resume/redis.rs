//! The copy of resumable streams that every replica can read: one Redis Stream per stream
//! (entry ids `0-<event number>`, capped with `MAXLEN` and trimmed to the byte cap,
//! expiring `resume_window` after the end), its owner's key id beside it, and a lease that a
//! replica serving a resumed client renews so that the owner keeps generating.
//!
//! The owner writes from a task of its own, so a slow or absent Redis never holds up the
//! stream; a reader checks that the numbers follow each other, so an event lost on the way
//! to Redis is a `resume_expired`, never a silent gap. A reader on another replica polls
//! with `XRANGE` rather than blocking in `XREAD BLOCK`, which would hold up every command
//! on the shared multiplexed connection.

use std::{collections::VecDeque, time::Duration};

use futures_util::stream::BoxStream;
use tokio::sync::mpsc;

use super::{EVENT_OVERHEAD, Event, StreamId};
use crate::{
    cluster::Redis,
    config::ResumeSettings,
    error::{Error, Result},
};

/// How often a reader on another replica looks for new events.
const POLL_EVERY: Duration = Duration::from_millis(25);
/// Events read per `XRANGE`.
const READ_BATCH: usize = 256;
/// How long a reader's lease lasts; it is renewed every second.
const LEASE: Duration = Duration::from_secs(3);
const LEASE_RENEWAL: Duration = Duration::from_secs(1);
/// How long a live stream's keys outlive its last event (a replica that dies mid-stream
/// leaves them behind this long, within the caps).
const LIVE_TTL: Duration = Duration::from_secs(300);
/// Events waiting for Redis per stream; beyond it they are not copied (readers of the
/// copy then get `resume_expired` at the gap).
const PENDING_WRITES: usize = 1024;

/// Field names of an entry.
const NAME: &str = "e";
const JSON: &str = "d";
const END: &str = "end";

#[derive(Clone)]
pub struct RedisLog {
    redis: Redis,
    settings: ResumeSettings,
}

/// What the owner sends its writer.
enum Write {
    Event(Event),
    End { last: u64, abandoned: bool },
}

/// The owner's side: events go to Redis in order, from a task of their own.
pub struct Writer(mpsc::Sender<Write>);

impl Writer {
    pub fn append(&self, event: &Event) {
        let _ = self.0.try_send(Write::Event(event.clone()));
    }

    pub fn end(&self, last: u64, abandoned: bool) {
        let _ = self.0.try_send(Write::End { last, abandoned });
    }
}

/// What a replica without the stream in memory finds in Redis.
pub enum Found {
    Events(BoxStream<'static, Result<Event>>),
    Finished,
}

impl RedisLog {
    pub fn new(redis: Redis, settings: ResumeSettings) -> RedisLog {
        RedisLog { redis, settings }
    }

    fn key(&self, stream: &StreamId, what: &str) -> String {
        self.redis.key(&format!("stream:{stream}"), what)
    }

    /// Starts the writer of `owner`'s new stream.
    pub fn writer(&self, stream: &StreamId, owner: &str) -> Writer {
        let (tx, rx) = mpsc::channel(PENDING_WRITES);
        tokio::spawn(self.clone().write(stream.clone(), owner.to_owned(), rx));
        Writer(tx)
    }

    async fn write(self, stream: StreamId, owner: String, mut writes: mpsc::Receiver<Write>) {
        let events = self.key(&stream, "events");
        let owner_key = self.key(&stream, "owner");
        let live_ttl = (self.settings.window + LIVE_TTL).as_secs();
        // A bound on the entries under the byte cap, as Redis's own cap.
        let max_len = self.settings.max_bytes_per_stream / EVENT_OVERHEAD;
        let mut sizes: VecDeque<(u64, usize)> = VecDeque::new();
        let mut bytes = 0;
        while let Some(write) = writes.recv().await {
            let mut pipe = redis::pipe();
            match write {
                Write::Event(event) => {
                    if event.seq == 1 {
                        pipe.cmd("SET")
                            .arg(&owner_key)
                            .arg(&owner)
                            .arg("EX")
                            .arg(live_ttl)
                            .ignore();
                    }
                    pipe.cmd("XADD")
                        .arg(&events)
                        .arg("MAXLEN")
                        .arg("~")
                        .arg(max_len)
                        .arg(format!("0-{}", event.seq))
                        .arg(NAME)
                        .arg(event.name())
                        .arg(JSON)
                        .arg(event.json())
                        .ignore();
                    bytes += event.size();
                    sizes.push_back((event.seq, event.size()));
                    let mut trimmed = false;
                    while bytes > self.settings.max_bytes_per_stream && sizes.len() > 1 {
                        if let Some((_, size)) = sizes.pop_front() {
                            bytes -= size;
                            trimmed = true;
                        }
                    }
                    if trimmed && let Some((first_kept, _)) = sizes.front() {
                        pipe.cmd("XTRIM")
                            .arg(&events)
                            .arg("MINID")
                            .arg(format!("0-{first_kept}"))
                            .ignore();
                    }
                    for key in [&events, &owner_key] {
                        pipe.cmd("EXPIRE").arg(key).arg(live_ttl).ignore();
                    }
                }
                Write::End {
                    abandoned: true, ..
                } => {
                    pipe.cmd("DEL").arg(&events).arg(&owner_key).ignore();
                }
                Write::End { last, .. } => {
                    pipe.cmd("XADD")
                        .arg(&events)
                        .arg(format!("0-{}", last + 1))
                        .arg(END)
                        .arg("1")
                        .ignore();
                    let window = self.settings.window.as_secs().max(1);
                    for key in [&events, &owner_key] {
                        pipe.cmd("EXPIRE").arg(key).arg(window).ignore();
                    }
                }
            }
            let mut connection = self.redis.connection();
            // A failure is logged and counted by `run`; readers see the gap it leaves.
            let _ = self
                .redis
                .run("resume_append", pipe.query_async::<()>(&mut connection))
                .await;
        }
    }

    /// Whether a client on another replica reads the stream now.
    pub async fn listened_elsewhere(&self, stream: &StreamId) -> bool {
        let mut connection = self.redis.connection();
        let lease = self.key(stream, "listening");
        self.redis
            .run(
                "resume_lease",
                redis::cmd("EXISTS")
                    .arg(&lease)
                    .query_async::<bool>(&mut connection),
            )
            .await
            .unwrap_or(false)
    }

    /// `owner`'s stream after `after`, then the rest, read from Redis.
    pub async fn read(&self, stream: &StreamId, owner: &str, after: u64) -> Result<Found> {
        let mut connection = self.redis.connection();
        let stored_owner: Option<String> = self
            .redis
            .run(
                "resume_read",
                redis::cmd("GET")
                    .arg(self.key(stream, "owner"))
                    .query_async(&mut connection),
            )
            .await
            .map_err(|_| unreachable())?;
        match stored_owner {
            None => return Err(super::memory::expired(stream)),
            Some(stored) if stored != owner => return Err(super::memory::not_yours(stream)),
            Some(_) => {}
        }
        let Some(from) = after.checked_add(1) else {
            return Err(no_event(stream, after));
        };
        let first = self.range(stream, from, 1).await?;
        match first.first() {
            Some(Entry::End(_)) => return Ok(Found::Finished),
            Some(Entry::Event(event)) if event.seq > after + 1 => {
                return Err(Error::ResumeExpired(format!(
                    "the events of stream `{stream}` after {after} up to {} were dropped to stay under `resume_max_bytes_per_stream`; start a new stream",
                    event.seq - 1
                )));
            }
            Some(Entry::Event(_)) => {}
            None => self.check_not_past_end(stream, after).await?,
        }
        let log = self.clone();
        let stream = stream.clone();
        Ok(Found::Events(Box::pin(async_stream::stream! {
            let mut next = from;
            let mut lease_renewed: Option<tokio::time::Instant> = None;
            loop {
                if lease_renewed.is_none_or(|at| at.elapsed() >= LEASE_RENEWAL) {
                    // Keys that expired or were deleted (the owner died, or abandoned the
                    // stream) end the reader instead of leaving it polling for ever.
                    if lease_renewed.is_some()
                        && let Err(err) = log.check_not_past_end(&stream, next - 1).await
                    {
                        yield Err(err);
                        return;
                    }
                    log.renew_lease(&stream).await;
                    lease_renewed = Some(tokio::time::Instant::now());
                }
                let entries = match log.range(&stream, next, READ_BATCH).await {
                    Ok(entries) => entries,
                    Err(err) => {
                        yield Err(err);
                        return;
                    }
                };
                if entries.is_empty() {
                    tokio::time::sleep(POLL_EVERY).await;
                    continue;
                }
                for entry in entries {
                    let seq = match &entry {
                        Entry::Event(event) => event.seq,
                        Entry::End(seq) => *seq,
                    };
                    if seq != next {
                        yield Err(Error::ResumeExpired(format!(
                            "events {next} to {} of stream `{stream}` did not reach Redis; start a new stream",
                            seq - 1
                        )));
                        return;
                    }
                    match entry {
                        Entry::End(_) => return,
                        Entry::Event(event) => {
                            next = event.seq + 1;
                            yield Ok(event);
                        }
                    }
                }
            }
        })))
    }

    /// Fails when the stream's events are gone from Redis, or when it ended before event
    /// `after`: nothing would ever come after it.
    async fn check_not_past_end(&self, stream: &StreamId, after: u64) -> Result<()> {
        let mut connection = self.redis.connection();
        let last: Vec<(String, Vec<Vec<u8>>)> = self
            .redis
            .run(
                "resume_read",
                redis::cmd("XREVRANGE")
                    .arg(self.key(stream, "events"))
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1)
                    .query_async(&mut connection),
            )
            .await
            .map_err(|_| unreachable())?;
        match last.into_iter().find_map(Entry::of) {
            None => Err(super::memory::expired(stream)),
            Some(Entry::End(end)) if end <= after => Err(no_event(stream, after)),
            Some(_) => Ok(()),
        }
    }

    async fn renew_lease(&self, stream: &StreamId) {
        let mut connection = self.redis.connection();
        let _ = self
            .redis
            .run(
                "resume_lease",
                redis::cmd("SET")
                    .arg(self.key(stream, "listening"))
                    .arg(1)
                    .arg("PX")
                    .arg(LEASE.as_millis() as u64)
                    .query_async::<()>(&mut connection),
            )
            .await;
    }

    /// Up to `count` entries from event `from` on.
    async fn range(&self, stream: &StreamId, from: u64, count: usize) -> Result<Vec<Entry>> {
        let mut connection = self.redis.connection();
        let entries: Vec<(String, Vec<Vec<u8>>)> = self
            .redis
            .run(
                "resume_read",
                redis::cmd("XRANGE")
                    .arg(self.key(stream, "events"))
                    .arg(format!("0-{from}"))
                    .arg("+")
                    .arg("COUNT")
                    .arg(count)
                    .query_async(&mut connection),
            )
            .await
            .map_err(|_| unreachable())?;
        Ok(entries.into_iter().filter_map(Entry::of).collect())
    }
}

fn no_event(stream: &StreamId, after: u64) -> Error {
    Error::InvalidRequest(format!("stream `{stream}` has no event {after}"))
}

fn unreachable() -> Error {
    Error::UpstreamUnavailable(
        "the stream is held in Redis, which does not answer; retry shortly".into(),
    )
}

/// One entry of a stream's Redis Stream.
enum Entry {
    Event(Event),
    /// The end, numbered one past the last event.
    End(u64),
}

impl Entry {
    /// `(id, [field, value, …])` as `XRANGE` gives it; `None` for what this gateway does
    /// not write.
    fn of((id, fields): (String, Vec<Vec<u8>>)) -> Option<Entry> {
        let seq: u64 = id.strip_prefix("0-")?.parse().ok()?;
        let mut name = None;
        let mut json = None;
        for pair in fields.chunks(2) {
            match pair {
                [field, _] if field == END.as_bytes() => return Some(Entry::End(seq)),
                [field, value] if field == NAME.as_bytes() => name = Some(value),
                [field, value] if field == JSON.as_bytes() => json = Some(value),
                _ => {}
            }
        }
        Some(Entry::Event(Event::new(seq, name?, json?)))
    }
}
