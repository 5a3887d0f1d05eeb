//! Resumable streams (`resume_window`): the events of an answer, serialized once, are
//! numbered and held so that a client that lost its connection can come back for the ones
//! it missed and the rest, exactly once and in order.
//!
//! A recorder task owns the [`Generation`] of a resumable stream: it appends each event to
//! the store and cancels the generation once the stream has had no client for
//! `resume_window`. Clients (the first one and those that resume) read the store, never
//! the generation, so the first and a resumed client see the same numbered events. The
//! store holds opaque events (a name and JSON bytes): new kinds of events need no change
//! here.

mod memory;
mod redis;

use std::{fmt, pin::Pin, sync::Arc, task::Poll, time::Duration};

use futures_util::{Stream, StreamExt, stream::BoxStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use self::{
    memory::MemoryStore,
    redis::{Found, RedisLog, Writer},
};
use crate::{
    cluster::Redis,
    config::ResumeSettings,
    error::{Error, Result},
    generation::Generation,
    provider::Chunk,
    telemetry,
};

/// What a held event costs besides its bytes: its slot in the queue (32 bytes), the
/// reference counts, the heap's rounding and what the allocator keeps around it (the bench
/// measured about 160 bytes of RSS per event of 49 bytes: `--only resume`).
const EVENT_OVERHEAD: usize = 112;

/// A stream's id: 128 random bits as 32 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamId(Arc<str>);

impl StreamId {
    pub fn new() -> StreamId {
        StreamId(uuid::Uuid::new_v4().simple().to_string().into())
    }

    pub fn parse(text: &str) -> Option<StreamId> {
        (text.len() == 32 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| StreamId(text.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for StreamId {
    fn default() -> Self {
        StreamId::new()
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An event's id, `<stream id>:<sequence number>` (the first event is 1): the SSE `id:`
/// that `Last-Event-ID` brings back, from which the stream is found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventId {
    pub stream: StreamId,
    pub seq: u64,
}

impl EventId {
    /// Reads a `Last-Event-ID`.
    pub fn parse(text: &str) -> Result<EventId> {
        text.split_once(':')
            .and_then(|(stream, seq)| {
                Some(EventId {
                    stream: StreamId::parse(stream)?,
                    seq: seq.parse().ok()?,
                })
            })
            .ok_or_else(|| {
                Error::InvalidRequest(format!(
                    "`Last-Event-ID: {}` is not an event id of this gateway (`<stream id>:<number>`)",
                    text.chars().take(80).flat_map(char::escape_debug).collect::<String>()
                ))
            })
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.stream, self.seq)
    }
}

/// One event of a stream, serialized: its name (`chunk`, `done`, ...) and its JSON, in one
/// shared allocation (a held event costs its bytes, a 32-byte slot and one heap header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub seq: u64,
    /// The name, then the JSON.
    bytes: Arc<[u8]>,
    name_len: u32,
}

impl Event {
    pub fn new(seq: u64, name: &[u8], json: &[u8]) -> Event {
        let mut bytes = Vec::with_capacity(name.len() + json.len());
        bytes.extend_from_slice(name);
        bytes.extend_from_slice(json);
        Event {
            seq,
            bytes: bytes.into(),
            name_len: u32::try_from(name.len()).unwrap_or(u32::MAX),
        }
    }

    pub fn name(&self) -> &[u8] {
        &self.bytes[..self.name_len as usize]
    }

    pub fn json(&self) -> &[u8] {
        &self.bytes[self.name_len as usize..]
    }

    /// What holding it costs, for the caps.
    fn size(&self) -> usize {
        self.bytes.len() + EVENT_OVERHEAD
    }
}

/// How an answer's items become events (a name and JSON); the transports own the wire format.
pub type Serialize = fn(Result<Chunk>) -> Option<(&'static str, Vec<u8>)>;

/// The events of resumable streams, and the recorders that fill them.
pub struct Resume {
    settings: ResumeSettings,
    memory: Arc<MemoryStore>,
    /// The copy other replicas read, with `[cluster] redis_url`.
    shared: Option<RedisLog>,
}

/// A resume's answer.
pub enum Resumed {
    /// The missed events, then the rest as they come.
    Events(Listening),
    /// The stream ended and the client had every event: nothing more to send.
    Finished,
}

impl Resume {
    /// The store; with resumption on, a task frees expired streams every second.
    pub fn new(settings: ResumeSettings, redis: Option<&Redis>) -> Resume {
        let memory = Arc::new(MemoryStore::new(settings));
        if settings.enabled() {
            memory::sweep_every_second(Arc::downgrade(&memory));
        }
        Resume {
            settings,
            memory,
            shared: redis
                .filter(|_| settings.enabled())
                .map(|redis| RedisLog::new(redis.clone(), settings)),
        }
    }

    pub fn enabled(&self) -> bool {
        self.settings.enabled()
    }

    /// Records `generation` under a new stream id for the API key `owner`, and returns its
    /// events as the first client reads them. The generation goes on while the stream has
    /// no client, for `resume_window`.
    pub fn record(&self, owner: &str, generation: Generation, serialize: Serialize) -> Listening {
        let stream = StreamId::new();
        let (listeners, watching) = watch::channel(0usize);
        let cancel = CancellationToken::new();
        let first = self.memory.open(&stream, owner, listeners, cancel.clone());
        let recorder = Recorder {
            memory: self.memory.clone(),
            writer: self
                .shared
                .as_ref()
                .map(|shared| shared.writer(&stream, owner)),
            shared: self.shared.clone(),
            stream: stream.clone(),
            window: self.settings.window,
        };
        tokio::spawn(recorder.run(generation, serialize, watching, cancel.clone()));
        Listening {
            stream,
            events: first,
            cancel,
        }
    }

    /// The events of the stream `after` names, after it, for the API key `owner`: from
    /// this process when it holds the stream, else from Redis.
    pub async fn resume(&self, owner: &str, after: &EventId) -> Result<Resumed> {
        let resumed = self.find(owner, after).await;
        let outcome = match &resumed {
            Ok(Resumed::Events(_)) => "resumed",
            Ok(Resumed::Finished) => "finished",
            Err(Error::ResumeExpired(_)) => "expired",
            Err(_) => "refused",
        };
        metrics::counter!(telemetry::RESUMES, "outcome" => outcome).increment(1);
        resumed
    }

    async fn find(&self, owner: &str, after: &EventId) -> Result<Resumed> {
        if !self.enabled() {
            return Err(Error::ResumeExpired(format!(
                "stream `{}` cannot be resumed: resumption is off on this gateway (resume_window = 0); start a new stream without Last-Event-ID",
                after.stream
            )));
        }
        if let Some(shared) = &self.shared
            && !self.memory.holds(&after.stream)
        {
            return Ok(match shared.read(&after.stream, owner, after.seq).await? {
                Found::Events(events) => Resumed::Events(Listening {
                    stream: after.stream.clone(),
                    events,
                    // The generation runs on another replica.
                    cancel: CancellationToken::new(),
                }),
                Found::Finished => Resumed::Finished,
            });
        }
        if self.memory.finished_at(&after.stream, owner, after.seq)? {
            return Ok(Resumed::Finished);
        }
        let events = self.memory.read(&after.stream, owner, after.seq)?;
        Ok(Resumed::Events(Listening {
            stream: after.stream.clone(),
            events,
            cancel: self.memory.cancel_token(&after.stream),
        }))
    }
}

/// A client reading a stream's events; while it exists the stream has a client.
pub struct Listening {
    pub stream: StreamId,
    events: BoxStream<'static, Result<Event>>,
    cancel: CancellationToken,
}

impl Listening {
    /// Ends the generation at the client's request (`{"type":"cancel"}`).
    pub fn cancel(&self) {
        self.cancel.cancel();
    }
}

impl Stream for Listening {
    type Item = Result<Event>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Self::Item>> {
        self.events.poll_next_unpin(cx)
    }
}

/// Appends a generation's events to the store(s).
struct Recorder {
    memory: Arc<MemoryStore>,
    writer: Option<Writer>,
    shared: Option<RedisLog>,
    stream: StreamId,
    window: Duration,
}

impl Recorder {
    /// Appends the generation's events until it ends, the client cancels it, or it has had
    /// no client (here or on another replica) for `window`.
    async fn run(
        self,
        mut generation: Generation,
        serialize: Serialize,
        listeners: watch::Receiver<usize>,
        cancel: CancellationToken,
    ) {
        let abandoned = self.abandoned(listeners);
        tokio::pin!(abandoned);
        let mut seq = 0;
        loop {
            tokio::select! {
                biased;
                item = generation.next() => match item {
                    Some(item) => {
                        // Items without an event of their own (a tool call's start and
                        // input fragments) are not stored.
                        let Some((name, json)) = serialize(item) else { continue };
                        seq += 1;
                        let event = Event::new(seq, name.as_bytes(), &json);
                        if let Some(writer) = &self.writer {
                            writer.append(&event);
                        }
                        self.memory.append(&self.stream, event);
                    }
                    None => break,
                },
                _ = cancel.cancelled() => {
                    generation.cancel();
                    break;
                }
                _ = &mut abandoned => {
                    tracing::info!(
                        stream = %self.stream,
                        window = ?self.window,
                        "nobody came back for the stream: cancelling it"
                    );
                    drop(generation);
                    if let Some(writer) = &self.writer {
                        writer.end(seq, true);
                    }
                    self.memory.remove(&self.stream);
                    return;
                }
            }
        }
        if let Some(writer) = &self.writer {
            writer.end(seq, false);
        }
        self.memory.end(&self.stream);
    }

    /// Resolves once nobody has listened for `window` in a row.
    async fn abandoned(&self, mut listeners: watch::Receiver<usize>) {
        loop {
            if listeners.wait_for(|count| *count == 0).await.is_err() {
                // The stream was removed from the store: nobody can come back.
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(self.window) => {
                    let elsewhere = match &self.shared {
                        Some(shared) => shared.listened_elsewhere(&self.stream).await,
                        None => false,
                    };
                    if !elsewhere {
                        return;
                    }
                }
                gone = async { listeners.wait_for(|count| *count > 0).await.is_err() } => {
                    if gone {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_id_names_its_stream_and_number() {
        let stream = StreamId::new();
        let id = EventId { stream, seq: 42 };
        assert_eq!(EventId::parse(&id.to_string()).unwrap(), id);
        for bad in [
            "",
            "abc",
            "abc:1",
            &format!("{}:x", id.stream),
            &format!("{}", id.stream),
        ] {
            assert_eq!(
                EventId::parse(bad).unwrap_err().code(),
                "invalid_request",
                "{bad}"
            );
        }
    }
}
