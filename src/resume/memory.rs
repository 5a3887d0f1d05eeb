//! Streams' events held in this process, within two byte caps (per stream, in all), until
//! `resume_window` after the stream ended.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, PoisonError, Weak},
    time::Duration,
};

use futures_util::stream::BoxStream;
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{Event, StreamId};
use crate::{
    config::ResumeSettings,
    error::{Error, Result},
    telemetry,
};

/// Streams dropped for the total cap that a resume is told about.
const EVICTED_REMEMBERED: usize = 1024;
/// How often expired streams are freed.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

pub struct MemoryStore {
    settings: ResumeSettings,
    streams: Mutex<Streams>,
}

#[derive(Default)]
struct Streams {
    by_id: HashMap<StreamId, Buffer>,
    /// Bytes of every buffer's events.
    bytes: usize,
    /// Ended streams, by when they expire (the window is the same for all, so this is also
    /// the order in which they ended).
    expiring: VecDeque<(Instant, StreamId)>,
    /// The last streams dropped whole to stay under `resume_max_bytes_total`, so that a
    /// resume of one is told why.
    evicted: VecDeque<StreamId>,
}

/// One stream's events, oldest first.
struct Buffer {
    /// The API key that started it: the only one that may resume it.
    owner: String,
    events: VecDeque<Event>,
    bytes: usize,
    /// The last event dropped to stay under a cap, and which cap.
    dropped: Option<(u64, &'static str)>,
    /// Number of the last event appended; readers wait for it to change.
    last: watch::Sender<u64>,
    ended: bool,
    /// How many clients read the stream.
    listeners: Arc<watch::Sender<usize>>,
    /// Ends the generation (a client's `cancel`).
    cancel: CancellationToken,
}

/// One more client of a stream, until dropped.
struct ListenerGuard(Arc<watch::Sender<usize>>);

impl ListenerGuard {
    fn new(listeners: Arc<watch::Sender<usize>>) -> ListenerGuard {
        listeners.send_modify(|count| *count += 1);
        ListenerGuard(listeners)
    }
}

impl Drop for ListenerGuard {
    fn drop(&mut self) {
        self.0.send_modify(|count| *count -= 1);
    }
}

impl MemoryStore {
    pub fn new(settings: ResumeSettings) -> MemoryStore {
        MemoryStore {
            settings,
            streams: Mutex::default(),
        }
    }

    fn streams(&self) -> std::sync::MutexGuard<'_, Streams> {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Holds a new stream of `owner`'s and returns its events as its first client reads
    /// them.
    pub fn open(
        self: &Arc<Self>,
        stream: &StreamId,
        owner: &str,
        listeners: watch::Sender<usize>,
        cancel: CancellationToken,
    ) -> BoxStream<'static, Result<Event>> {
        let buffer = Buffer {
            owner: owner.to_owned(),
            events: VecDeque::new(),
            bytes: 0,
            dropped: None,
            last: watch::Sender::new(0),
            ended: false,
            listeners: Arc::new(listeners),
            cancel,
        };
        let first = self.reader(&buffer, stream, 0);
        self.streams().by_id.insert(stream.clone(), buffer);
        first
    }

    /// Appends `event`, dropping the stream's oldest events beyond its cap, and beyond the
    /// total first the ended streams that expire soonest, then this stream's oldest.
    pub fn append(&self, stream: &StreamId, event: Event) {
        let size = event.size();
        let settings = self.settings;
        let mut guard = self.streams();
        let streams = &mut *guard;
        while streams.bytes + size > settings.max_bytes_total {
            let Some((_, oldest)) = streams.expiring.pop_front() else {
                break;
            };
            streams.remove(&oldest);
            if streams.evicted.len() == EVICTED_REMEMBERED {
                streams.evicted.pop_front();
            }
            streams.evicted.push_back(oldest);
        }
        let over_total = streams.bytes + size > settings.max_bytes_total;
        let Some(buffer) = streams.by_id.get_mut(stream) else {
            return;
        };
        let mut freed = 0;
        let mut cap = "resume_max_bytes_per_stream";
        while !buffer.events.is_empty()
            && (buffer.bytes + size > settings.max_bytes_per_stream || (over_total && freed < size))
        {
            if buffer.bytes + size <= settings.max_bytes_per_stream {
                cap = "resume_max_bytes_total";
            }
            let Some(oldest) = buffer.events.pop_front() else {
                break;
            };
            buffer.bytes -= oldest.size();
            freed += oldest.size();
            buffer.dropped = Some((oldest.seq, cap));
        }
        let seq = event.seq;
        buffer.bytes += size;
        buffer.events.push_back(event);
        buffer.last.send_replace(seq);
        streams.bytes = streams.bytes + size - freed;
        streams.count_bytes();
    }

    /// The stream has no more events; it is held for `resume_window` from now.
    pub fn end(&self, stream: &StreamId) {
        let mut streams = self.streams();
        if let Some(buffer) = streams.by_id.get_mut(stream) {
            // Held for the window as is: the queue's doubling room would be a third of it.
            buffer.events.shrink_to_fit();
            buffer.ended = true;
            buffer.last.send_modify(|_| {});
            streams
                .expiring
                .push_back((Instant::now() + self.settings.window, stream.clone()));
        }
    }

    pub fn remove(&self, stream: &StreamId) {
        self.streams().remove(stream);
    }

    /// Frees the streams whose window is over.
    fn sweep(&self) {
        let now = Instant::now();
        let mut streams = self.streams();
        while let Some((expires, _)) = streams.expiring.front()
            && *expires <= now
        {
            if let Some((_, stream)) = streams.expiring.pop_front() {
                streams.remove(&stream);
            }
        }
    }

    /// Whether the stream is held here.
    pub fn holds(&self, stream: &StreamId) -> bool {
        self.streams().by_id.contains_key(stream)
    }

    /// What cancels the stream's generation.
    pub fn cancel_token(&self, stream: &StreamId) -> CancellationToken {
        self.streams()
            .by_id
            .get(stream)
            .map(|buffer| buffer.cancel.clone())
            .unwrap_or_default()
    }

    /// Whether `owner`'s stream has ended with event `seq`: a client that read it has all.
    pub fn finished_at(&self, stream: &StreamId, owner: &str, seq: u64) -> Result<bool> {
        let streams = self.streams();
        let buffer = streams.find(stream, owner)?;
        Ok(buffer.ended && *buffer.last.borrow() == seq)
    }

    /// `owner`'s stream from the event after `after` on, the rest as it comes, until it
    /// ends. The stream is read in batches under the lock, and waited for without it.
    pub fn read(
        self: &Arc<Self>,
        stream: &StreamId,
        owner: &str,
        after: u64,
    ) -> Result<BoxStream<'static, Result<Event>>> {
        let streams = self.streams();
        let buffer = streams.find(stream, owner)?;
        buffer.check_held(stream, after)?;
        // Clients read the events from here, so no client has one past the last appended
        // (and `after + 1` below cannot overflow).
        if after > *buffer.last.borrow() {
            return Err(Error::InvalidRequest(format!(
                "stream `{stream}` has no event {after}"
            )));
        }
        Ok(self.reader(buffer, stream, after))
    }

    /// A client of `buffer` (the buffer of `stream`) from the event after `after` on.
    fn reader(
        self: &Arc<Self>,
        buffer: &Buffer,
        stream: &StreamId,
        after: u64,
    ) -> BoxStream<'static, Result<Event>> {
        let mut appended = buffer.last.subscribe();
        let listener = ListenerGuard::new(buffer.listeners.clone());
        let store = self.clone();
        let stream = stream.clone();
        Box::pin(async_stream::stream! {
            let _listener = listener;
            let mut next = after + 1;
            loop {
                appended.borrow_and_update();
                let batch = {
                    let streams = store.streams();
                    match streams.by_id.get(&stream) {
                        None => Err(expired(&stream)),
                        Some(buffer) => buffer.check_held(&stream, next - 1).map(|()| {
                            let skip = buffer.events.iter().take_while(|e| e.seq < next).count();
                            let batch: Vec<Event> = buffer.events.iter().skip(skip).cloned().collect();
                            (batch, buffer.ended)
                        }),
                    }
                };
                match batch {
                    Err(err) => {
                        yield Err(err);
                        return;
                    }
                    Ok((batch, ended)) => {
                        if batch.is_empty() {
                            if ended {
                                return;
                            }
                            // An error means it was removed: the next look says so.
                            let _ = appended.changed().await;
                        }
                        for event in batch {
                            next = event.seq + 1;
                            yield Ok(event);
                        }
                    }
                }
            }
        })
    }
}

impl Streams {
    fn remove(&mut self, stream: &StreamId) {
        if let Some(buffer) = self.by_id.remove(stream) {
            self.bytes -= buffer.bytes;
            self.count_bytes();
        }
    }

    fn count_bytes(&self) {
        metrics::gauge!(telemetry::RESUME_BYTES_HELD).set(self.bytes as f64);
    }

    fn find(&self, stream: &StreamId, owner: &str) -> Result<&Buffer> {
        let buffer = self.by_id.get(stream).ok_or_else(|| {
            if self.evicted.contains(stream) {
                Error::ResumeExpired(format!(
                    "the events of stream `{stream}` were dropped to stay under `resume_max_bytes_total`; start a new stream"
                ))
            } else {
                expired(stream)
            }
        })?;
        if buffer.owner != owner {
            return Err(not_yours(stream));
        }
        Ok(buffer)
    }
}

impl Buffer {
    /// Checks that every event after `after` is still held.
    fn check_held(&self, stream: &StreamId, after: u64) -> Result<()> {
        match self.dropped {
            Some((dropped, cap)) if after < dropped => Err(Error::ResumeExpired(format!(
                "the events of stream `{stream}` after {after} up to {dropped} were dropped to stay under `{cap}`; start a new stream"
            ))),
            _ => Ok(()),
        }
    }
}

pub(super) fn not_yours(stream: &StreamId) -> Error {
    Error::UnknownStream(format!(
        "stream `{stream}` was not started with this API key"
    ))
}

pub(super) fn expired(stream: &StreamId) -> Error {
    Error::ResumeExpired(format!(
        "stream `{stream}` is not held here: it ended or lost its clients more than `resume_window` ago (or never existed); start a new stream"
    ))
}

/// Frees expired streams every second while the store exists.
pub fn sweep_every_second(store: Weak<MemoryStore>) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(SWEEP_EVERY);
        loop {
            every.tick().await;
            match store.upgrade() {
                Some(store) => store.sweep(),
                None => return,
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    const OWNER: &str = "team-a";

    /// A store whose events of 8 JSON bytes (and a 1-byte name) cost 121 bytes each.
    fn store(per_stream_events: usize, total_events: usize) -> Arc<MemoryStore> {
        Arc::new(MemoryStore::new(ResumeSettings {
            window: Duration::from_secs(30),
            max_bytes_per_stream: per_stream_events * event(1).size(),
            max_bytes_total: total_events * event(1).size(),
        }))
    }

    fn event(seq: u64) -> Event {
        Event::new(seq, b"c", format!("{seq:08}").as_bytes())
    }

    fn open(store: &Arc<MemoryStore>, events: u64) -> StreamId {
        let stream = StreamId::new();
        drop(store.open(
            &stream,
            OWNER,
            watch::Sender::new(0),
            CancellationToken::new(),
        ));
        for seq in 1..=events {
            store.append(&stream, event(seq));
        }
        stream
    }

    async fn seqs(store: &Arc<MemoryStore>, stream: &StreamId, after: u64) -> Vec<u64> {
        store
            .read(stream, OWNER, after)
            .unwrap()
            .map(|event| event.unwrap().seq)
            .collect()
            .await
    }

    fn refusal(store: &Arc<MemoryStore>, stream: &StreamId, after: u64) -> String {
        match store.read(stream, OWNER, after) {
            Err(err) => format!("{} {err}", err.code()),
            Ok(_) => panic!("the read was not refused"),
        }
    }

    #[tokio::test]
    async fn a_stream_keeps_its_newest_events_under_its_cap() {
        let store = store(3, 100);
        let stream = open(&store, 5);
        store.end(&stream);
        assert_eq!(seqs(&store, &stream, 2).await, [3, 4, 5]);
        let refused = refusal(&store, &stream, 1);
        assert!(refused.starts_with("resume_expired"), "{refused}");
        assert!(refused.contains("resume_max_bytes_per_stream"), "{refused}");
        assert_eq!(
            store.read(&stream, "team-b", 2).err().map(|err| err.code()),
            Some("unknown_stream")
        );
    }

    #[tokio::test]
    async fn the_total_cap_drops_ended_streams_first_then_the_oldest_events_of_the_writer() {
        let store = store(4, 6);
        let ended = open(&store, 3);
        store.end(&ended);
        let live = open(&store, 4);
        let refused = refusal(&store, &ended, 0);
        assert!(refused.contains("resume_max_bytes_total"), "{refused}");
        // Nothing ended is left to drop: the stream being written loses its oldest events.
        let other = open(&store, 3);
        store.end(&live);
        store.end(&other);
        assert_eq!(seqs(&store, &live, 0).await, [1, 2, 3, 4]);
        let refused = refusal(&store, &other, 0);
        assert!(refused.contains("resume_max_bytes_total"), "{refused}");
        assert_eq!(seqs(&store, &other, 1).await, [2, 3]);
    }
}
