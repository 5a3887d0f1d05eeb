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
            return Err(Error::RateLimited {
                message: format!(
                    "more than {MAX_QUEUED} prompts are waiting on this connection; wait for the answers"
                ),
                retry_after_secs: 1,
            });
        }
        let budget = self.settings.max_queued_bytes;
        if self.bytes + bytes > budget {
            return Err(Error::RateLimited {
                message: format!(
                    "the prompts waiting on this connection would take more than {budget} bytes (ws_max_queued_bytes); wait for the answers"
                ),
                retry_after_secs: 1,
            });
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn settings(per_connection: usize, total: usize) -> WsSettings {
        WsSettings {
            max_queued_bytes: per_connection,
            max_queued_bytes_total: total,
            ping_interval: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(2),
        }
    }

    fn code_of(queue: &mut Queue, bytes: usize) -> Option<&'static str> {
        queue
            .push(Incoming::Cancel, bytes)
            .err()
            .map(|err| err.code())
    }

    #[test]
    fn each_limit_refuses_and_the_gateways_bytes_come_back() {
        let mut counted = Queue::new(settings(1000, 1 << 40));
        for _ in 0..MAX_QUEUED {
            assert_eq!(code_of(&mut counted, 1), None);
        }
        assert_eq!(code_of(&mut counted, 1), Some("rate_limited"));

        let mut sized = Queue::new(settings(1000, 1 << 40));
        assert_eq!(code_of(&mut sized, 600), None);
        assert_eq!(code_of(&mut sized, 600), Some("rate_limited"));
        assert!(sized.pop().is_some());
        assert_eq!(
            code_of(&mut sized, 600),
            None,
            "a popped message frees its bytes"
        );

        // The gateway's budget is shared: it is measured against what is held now.
        let held = QUEUED_BYTES.load(Ordering::Acquire);
        let mut first = Queue::new(settings(1 << 30, held + 1500));
        let mut second = Queue::new(settings(1 << 30, held + 1500));
        assert_eq!(code_of(&mut first, 1000), None);
        assert_eq!(code_of(&mut second, 1000), Some("upstream_unavailable"));
        drop(first);
        assert_eq!(
            code_of(&mut second, 1000),
            None,
            "a closed connection gives back"
        );
    }
}
