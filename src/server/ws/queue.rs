//! The messages a client sends ahead while one of its prompts is answered, held within
//! three limits: a count and a byte budget per connection, and a byte budget shared by all
//! connections of the gateway. What does not fit is refused at once; nothing waits for room.

use std::{
    collections::VecDeque,
    sync::atomic::{AtomicUsize, Ordering},
};

use super::frame::Incoming;
use crate::{config::WsSettings, error::Error};

/// Messages a client may send ahead while one is being answered.
const MAX_QUEUED: usize = 16;

/// Bytes queued on all connections. The gateway is one per process, so is this count.
static QUEUED_BYTES: AtomicUsize = AtomicUsize::new(0);

/// One connection's messages waiting their turn, oldest first.
pub struct Queue {
    waiting: VecDeque<(Incoming, Held)>,
    /// Bytes of `waiting`.
    bytes: usize,
    settings: WsSettings,
}

impl Queue {
    pub fn new(settings: WsSettings) -> Self {
        Queue {
            waiting: VecDeque::new(),
            bytes: 0,
            settings,
        }
    }

    pub fn pop(&mut self) -> Option<Incoming> {
        let (incoming, held) = self.waiting.pop_front()?;
        self.bytes -= held.0;
        Some(incoming)
    }

    /// Queues `incoming`, a message of `bytes` bytes, or says which limit refuses it.
    pub fn push(&mut self, incoming: Incoming, bytes: usize) -> Result<(), Error> {
        if self.waiting.len() >= MAX_QUEUED {
            return Err(Error::RateLimited(
                format!(
                    "more than {MAX_QUEUED} prompts are waiting on this connection; wait for the answers"
                ),
                1,
            ));
        }
        let budget = self.settings.max_queued_bytes;
        if self.bytes + bytes > budget {
            return Err(Error::RateLimited(
                format!(
                    "the prompts waiting on this connection would take more than {budget} bytes (ws_max_queued_bytes); wait for the answers"
                ),
                1,
            ));
        }
        let total = self.settings.max_queued_bytes_total;
        let held = Held::reserve(bytes, total).ok_or_else(|| {
            Error::UpstreamUnavailable(format!(
                "the gateway holds its limit of {total} bytes of prompts waiting on WebSockets (ws_max_queued_bytes_total); retry shortly"
            ))
        })?;
        self.bytes += bytes;
        self.waiting.push_back((incoming, held));
        Ok(())
    }
}

/// Bytes counted in [`QUEUED_BYTES`] until dropped.
struct Held(usize);

impl Held {
    fn reserve(bytes: usize, total: usize) -> Option<Held> {
        QUEUED_BYTES
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                queued.checked_add(bytes).filter(|&sum| sum <= total)
            })
            .ok()
            .map(|_| Held(bytes))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        QUEUED_BYTES.fetch_sub(self.0, Ordering::AcqRel);
    }
}
