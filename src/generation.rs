//! The life of one streamed answer between the upstream and a transport.
//!
//! A task pumps the upstream stream into a small bounded channel that the transport reads.
//! The task is where the rules that hold for every transport live: the idle and total
//! timeouts, the end of a client that stops reading (`slow_client_timeout`), a client that
//! leaves or cancels (the upstream call is dropped at once), the end of the shutdown grace
//! period, and the accounting (tokens, metrics, log) when the answer ends.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures_util::{Stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_util::{sync::CancellationToken, task::task_tracker::TaskTrackerToken};
use tracing::Instrument;

use crate::{
    auth::Caller,
    error::{Error, Result},
    limiter::Admission,
    provider::{Chunk, ChunkStream, Finish, UpstreamSettings, Usage, UsageMeter},
    telemetry::{self, CancelReason},
};

/// Chunks buffered between the upstream and a client that reads slower than the model
/// writes; beyond it the upstream waits (and after `slow_client_timeout` is dropped).
const BUFFERED_CHUNKS: usize = 32;

/// Which transport serves a generation, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `POST /invoke`: the stream collected into one answer.
    Invoke,
    Sse,
    WebSocket,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Invoke => "invoke",
            Transport::Sse => "sse",
            Transport::WebSocket => "ws",
        }
    }
}

/// An answer being streamed: yields `Text` chunks, then one `Done` or one error.
/// Dropping it stops the upstream call.
pub struct Generation {
    /// How long the upstream took to its first chunk.
    pub upstream_wait: Duration,
    chunks: mpsc::Receiver<Result<Chunk>>,
    cancelled_by_client: Arc<AtomicBool>,
    transport: Transport,
}

/// Everything the pump needs besides the upstream stream.
pub struct Pump {
    pub model: String,
    pub caller: Caller,
    pub transport: Transport,
    pub settings: UpstreamSettings,
    pub slow_client_timeout: Duration,
    /// Fires when the shutdown grace period is over.
    pub shutdown_deadline: CancellationToken,
    /// Fires when the client's connection closes, even while nothing is being written.
    pub client_gone: CancellationToken,
    /// Upstream slots (global, per model) held for the stream's whole life.
    pub permits: Vec<OwnedSemaphorePermit>,
    /// The caller's stream lease and token reservation, settled when the pump ends.
    pub admission: Admission,
    /// What the provider reports of the tokens used by an answer that fails midway.
    pub usage: UsageMeter,
    /// Keeps a graceful shutdown waiting for this answer.
    pub in_flight: TaskTrackerToken,
    pub started: Instant,
}

/// How a generation ended, for the accounting.
enum Ended {
    Finished(Finish),
    Failed(Error),
    Cancelled(CancelReason),
}

impl Pump {
    /// Starts the task that forwards `upstream`, whose first item was already taken.
    pub fn start(self, first: Chunk, upstream: ChunkStream) -> Generation {
        let (tx, rx) = mpsc::channel(BUFFERED_CHUNKS);
        let cancelled_by_client = Arc::new(AtomicBool::new(false));
        let generation = Generation {
            upstream_wait: self.started.elapsed(),
            chunks: rx,
            cancelled_by_client: cancelled_by_client.clone(),
            transport: self.transport,
        };
        metrics::gauge!(telemetry::ACTIVE_STREAMS, "transport" => self.transport.as_str())
            .increment(1);
        tokio::spawn(
            async move {
                let ended = self
                    .forward(first, upstream, &tx, &cancelled_by_client)
                    .await;
                self.account(ended);
            }
            .in_current_span(),
        );
        generation
    }

    async fn forward(
        &self,
        first: Chunk,
        mut upstream: ChunkStream,
        tx: &mpsc::Sender<Result<Chunk>>,
        cancelled_by_client: &AtomicBool,
    ) -> Ended {
        let gone = || {
            if cancelled_by_client.load(Ordering::Relaxed) {
                Ended::Cancelled(CancelReason::ClientCancel)
            } else {
                Ended::Cancelled(CancelReason::ClientGone)
            }
        };
        // The futures that end a generation are made once, not once per chunk: re-creating
        // them registered two timers and three waiters per chunk (bench/RESULTS.md).
        let total_deadline = tokio::time::sleep_until(tokio::time::Instant::from_std(
            self.started + self.settings.total_timeout,
        ));
        let idle_deadline = tokio::time::sleep(self.settings.idle_timeout);
        let closed = tx.closed();
        let client_gone = self.client_gone.cancelled();
        let shutdown = self.shutdown_deadline.cancelled();
        tokio::pin!(total_deadline, idle_deadline, closed, client_gone, shutdown);
        let mut next = Some(Ok(first));
        loop {
            // Idle is measured while waiting on the upstream, not while a slow client holds up
            // the send below. Pushing a deadline later does not touch the timer wheel.
            if next.is_none() {
                idle_deadline
                    .as_mut()
                    .reset(tokio::time::Instant::now() + self.settings.idle_timeout);
            }
            let item = match next.take() {
                Some(item) => item,
                None => tokio::select! {
                    biased;
                    _ = &mut closed => return gone(),
                    _ = &mut client_gone => return gone(),
                    _ = &mut shutdown => Err(Error::ShuttingDown),
                    _ = &mut total_deadline => Err(Error::UpstreamTimeout(format!(
                        "model `{}` did not finish within the total timeout of {:?}",
                        self.model, self.settings.total_timeout
                    ))),
                    _ = &mut idle_deadline => Err(Error::UpstreamTimeout(format!(
                        "model `{}` sent nothing for {:?} (idle timeout)",
                        self.model, self.settings.idle_timeout
                    ))),
                    item = upstream.next() => item.unwrap_or_else(|| Err(Error::Upstream(format!(
                        "the answer of model `{}` ended before it was complete", self.model
                    )))),
                },
            };
            let ended = match &item {
                Ok(Chunk::Text(_)) => None,
                Ok(Chunk::Done(finish)) => Some(Ended::Finished(*finish)),
                Err(Error::ShuttingDown) => Some(Ended::Cancelled(CancelReason::Shutdown)),
                Err(err) => Some(Ended::Failed(err.clone())),
            };
            match tokio::time::timeout(self.slow_client_timeout, tx.send(item)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return gone(),
                Err(_) => return Ended::Cancelled(CancelReason::SlowClient),
            }
            if let Some(ended) = ended {
                return ended;
            }
        }
    }

    fn account(self, ended: Ended) {
        let model = self.model.clone();
        let elapsed = self.started.elapsed();
        match ended {
            Ended::Finished(finish) => {
                self.spend(finish.usage);
                tracing::info!(
                    stop_reason = ?finish.stop_reason,
                    input_tokens = finish.usage.input_tokens,
                    output_tokens = finish.usage.output_tokens,
                    millis = elapsed.as_millis() as u64,
                    "generation finished"
                );
            }
            Ended::Failed(err) => {
                // The part that was generated is still paid for.
                self.spend(self.usage.get());
                telemetry::count_failure(&model, &err);
                tracing::warn!(code = err.code(), "generation failed mid-stream: {err}");
            }
            Ended::Cancelled(reason) => {
                // What the upstream reported before the cancellation is paid for too.
                let usage = self.usage.get();
                self.admission
                    .record(u64::from(usage.input_tokens) + u64::from(usage.output_tokens));
                telemetry::count_cancellation(reason);
            }
        }
        metrics::histogram!(telemetry::UPSTREAM_SECONDS, "model" => model)
            .record(elapsed.as_secs_f64());
    }
}

impl Pump {
    /// Counts `usage` in the token metric and settles the caller's reservation to it.
    fn spend(&self, usage: Usage) {
        telemetry::count_tokens(&self.model, self.caller.id(), usage);
        self.admission
            .record(u64::from(usage.input_tokens) + u64::from(usage.output_tokens));
    }
}

impl Generation {
    /// Ends the generation at the client's request (`{"type":"cancel"}`).
    pub fn cancel(self) {
        self.cancelled_by_client.store(true, Ordering::Relaxed);
    }
}

impl Stream for Generation {
    type Item = Result<Chunk>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.chunks.poll_recv(cx)
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        metrics::gauge!(telemetry::ACTIVE_STREAMS, "transport" => self.transport.as_str())
            .decrement(1);
    }
}
