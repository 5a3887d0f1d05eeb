//! What every transport asks of the gateway: admit a request (shutdown, capacity, the
//! caller's limits), start the upstream call, and hand back the answer as a stream (the
//! whole answer of `/invoke` is that stream collected).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    auth::{Auth, Caller},
    cluster::Cluster,
    config::{Config, ServerSettings},
    error::{Error, Result},
    generation::{Generation, Pump, Transport},
    limiter::{Admission, Limiter},
    provider::UsageMeter,
    registry::{Model, Registry},
    request::GenerateRequest,
    resume::Resume,
    telemetry,
};

pub struct Gateway {
    pub registry: Registry,
    pub auth: Auth,
    pub settings: ServerSettings,
    pub shutdown: Shutdown,
    /// Resumable streams' events (`resume_window`).
    pub resume: Resume,
    /// The Redis shared with the other replicas, if any (`[cluster]`).
    pub cluster: Cluster,
    /// The keys' limits, in process or in the cluster's Redis.
    limiter: Limiter,
    /// Upstream calls in flight across all models.
    upstream_slots: Arc<Semaphore>,
}

/// The two moments of a graceful shutdown, and the work it waits for.
#[derive(Clone, Default)]
pub struct Shutdown {
    /// A stop was asked for: new work is refused, `/healthz` says `draining`.
    pub draining: CancellationToken,
    /// The grace period is over: work still in flight is ended.
    pub deadline: CancellationToken,
    /// Answers in flight and WebSocket sessions.
    pub work: TaskTracker,
}

impl Shutdown {
    /// Drains: refuses new work at once, and returns when the work in flight has finished
    /// or, at the latest, when `grace` is over and that work has been told to end.
    pub async fn drain(&self, grace: Duration) {
        self.draining.cancel();
        self.work.close();
        if tokio::time::timeout(grace, self.work.wait()).await.is_err() {
            self.deadline.cancel();
        }
    }
}

impl Gateway {
    /// Builds the gateway inside the Tokio runtime; fails on a `[cluster]` the Redis client
    /// cannot use.
    pub async fn build(config: &Config) -> Result<Gateway, String> {
        let cluster = Cluster::start(&config.cluster)?;
        let shutdown = Shutdown::default();
        Ok(Gateway {
            registry: Registry::build(config).await,
            auth: Auth::new(&config.api_keys),
            settings: config.server.clone(),
            resume: Resume::new(config.resume, cluster.redis()),
            limiter: Limiter::new(&config.api_keys, &cluster, &shutdown.work),
            shutdown,
            cluster,
            upstream_slots: Arc::new(Semaphore::new(config.server.max_concurrent_upstream)),
        })
    }

    /// Starts a streamed answer and waits for its first piece, so that a failure before the
    /// answer begins is an `Err` here — a real HTTP status — rather than an error inside a
    /// stream that already answered 200.
    pub async fn stream(
        &self,
        request: GenerateRequest,
        caller: &Caller,
        transport: Transport,
        client_gone: &CancellationToken,
    ) -> Result<Generation> {
        self.start(request, caller, transport, client_gone, client_gone.clone())
            .await
    }

    /// As [`Gateway::stream`], for a resumable stream: the client leaving after the first
    /// piece does not end the generation (its recorder does, see [`crate::resume`]).
    pub async fn stream_outliving_client(
        &self,
        request: GenerateRequest,
        caller: &Caller,
        transport: Transport,
        client_gone: &CancellationToken,
    ) -> Result<Generation> {
        self.start(
            request,
            caller,
            transport,
            client_gone,
            CancellationToken::new(),
        )
        .await
    }

    async fn start(
        &self,
        request: GenerateRequest,
        caller: &Caller,
        transport: Transport,
        client_gone: &CancellationToken,
        pump_client_gone: CancellationToken,
    ) -> Result<Generation> {
        let (model, request) = self.registry.prepare(request)?;
        let (permits, admission) = self.admit(&model, caller, request.max_tokens).await?;
        let started = Instant::now();
        let settings = model.spec.upstream;
        let usage = UsageMeter::default();
        let first = async {
            let mut upstream = model.stream(request, usage.clone()).await?;
            match upstream.next().await {
                Some(Ok(first)) => Ok((first, upstream)),
                Some(Err(err)) => Err(err),
                None => Err(Error::Upstream(format!(
                    "model `{}` ended its answer before writing anything",
                    model.spec.name
                ))),
            }
        };
        let started_stream = tokio::select! {
            first = tokio::time::timeout(settings.first_token_timeout, first) => match first {
                Ok(first) => first,
                Err(_) => Err(Error::UpstreamTimeout(format!(
                    "model `{}` did not start answering within {:?} (first token timeout)",
                    model.spec.name, settings.first_token_timeout
                ))),
            },
            _ = self.shutdown.deadline.cancelled() => Err(Error::ShuttingDown),
            _ = client_gone.cancelled() => Err(Error::ClientClosed),
        };
        let (first, upstream) =
            started_stream.inspect_err(|err| telemetry::count_failure(&model.spec.name, err))?;
        metrics::histogram!(telemetry::FIRST_CHUNK_SECONDS, "model" => model.spec.name.clone())
            .record(started.elapsed().as_secs_f64());
        let pump = Pump {
            model: model.spec.name.clone(),
            caller: caller.clone(),
            transport,
            settings,
            slow_client_timeout: self.settings.slow_client_timeout,
            shutdown_deadline: self.shutdown.deadline.clone(),
            client_gone: pump_client_gone,
            permits,
            admission,
            usage,
            in_flight: self.shutdown.work.token(),
            started,
        };
        Ok(pump.start(first, upstream))
    }

    /// Checks that the gateway takes new work and that the caller, the model and the
    /// gateway are under their limits; the permits returned hold the slots, the admission
    /// the caller's stream lease and token reservation (`max_tokens`). The slots are taken
    /// first and the caller's limits last, so that a refused request costs the caller nothing.
    async fn admit(
        &self,
        model: &Model,
        caller: &Caller,
        max_tokens: u32,
    ) -> Result<(Vec<OwnedSemaphorePermit>, Admission)> {
        if self.shutdown.draining.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let mut permits = Vec::with_capacity(2);
        let at_capacity =
            |what: String| Error::UpstreamUnavailable(format!("{what}; retry shortly"));
        permits.push(
            self.upstream_slots
                .clone()
                .try_acquire_owned()
                .map_err(|_| {
                    at_capacity(format!(
                        "the gateway is at its limit of {} upstream calls in flight",
                        self.settings.max_concurrent_upstream
                    ))
                })?,
        );
        permits.push(model.slots.clone().try_acquire_owned().map_err(|_| {
            at_capacity(format!(
                "model `{}` is at its limit of {} calls in flight",
                model.spec.name, model.spec.upstream.max_concurrent
            ))
        })?);
        let admission = self.limiter.admit(caller.key(), max_tokens).await?;
        Ok((permits, admission))
    }
}
