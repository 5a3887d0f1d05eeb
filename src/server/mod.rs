//! The web server: the middleware around the routes (`routes.rs`), shared state, and the one
//! place where errors become responses.

mod anthropic;
mod api;
mod connection;
mod events;
mod json_body;
mod openai;
mod origin;
mod routes;
mod sse;
mod ui;
mod ws;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use futures_util::StreamExt;
use metrics_exporter_prometheus::PrometheusHandle;
use poem::{
    Endpoint, EndpointExt, IntoEndpoint, IntoResponse, Request, Response,
    endpoint::BoxEndpoint,
    get, handler,
    http::{Method, header},
    listener::{Acceptor, TcpAcceptor},
    middleware::Cors,
    web::Data,
};
use poem_openapi::OpenApiService;
use tokio::net::TcpSocket;

pub use origin::OriginPolicy;

use crate::{config::ConnectionSettings, error::Error, gateway::Gateway, telemetry::RequestId};
use routes::Access;

/// How long, after draining, the server waits for connections to close by themselves.
const CLOSE_MARGIN: Duration = Duration::from_secs(5);
/// Exit status when a second SIGTERM/SIGINT cuts the drain short.
const FORCED_EXIT_CODE: i32 = 1;

pub struct AppState {
    pub gateway: Arc<Gateway>,
    pub origins: OriginPolicy,
    pub metrics: PrometheusHandle,
}

fn api_service() -> OpenApiService<(api::Api, openai::OpenAiApi, anthropic::AnthropicApi), ()> {
    OpenApiService::new(
        (api::Api, openai::OpenAiApi, anthropic::AnthropicApi),
        "modelgate",
        env!("CARGO_PKG_VERSION"),
    )
    .description(
        "A streaming gateway in front of large language models. `POST /invoke` answers \
             with the whole text; `/stream` streams it as Server-Sent Events; `/ws/model` \
             streams over WebSocket (see the README). `/v1/chat/completions` and \
             `/v1/models` speak OpenAI's API, for its SDKs and the tools built on them.",
    )
}

/// The OpenAPI document, as `modelgate openapi` prints it and `/openapi.json` serves it.
pub fn openapi_json() -> String {
    api_service().spec()
}

pub fn app(state: AppState) -> BoxEndpoint<'static> {
    let body_rules = BodyRules {
        max_bytes: state.gateway.settings.max_body_bytes,
        read_timeout: state.gateway.settings.body_read_timeout,
    };
    let origins = state.origins.clone();
    let state = Arc::new(state);
    let keys = state.clone();
    let endpoints = Arc::new(
        routes::router()
            .around(ui::page_at_root)
            .around(move |next, request| limit_body(next, request, body_rules))
            .around(move |next, request| require_key(next, request, keys.clone()))
            .data(state)
            .around(|next, request| async move {
                let path = request.uri().path().to_owned();
                Ok(match next.call(request).await {
                    Ok(response) => response.into_response(),
                    Err(err) => error_response(&err, &path),
                })
            }),
    );
    // Origins were checked before this runs, so poem's CORS only has to answer.
    let cross_origin = Arc::new(
        endpoints.clone().with(
            Cors::new()
                .allow_origins_fn(|_| true)
                .allow_methods([Method::GET, Method::POST])
                .allow_headers([
                    "authorization",
                    "content-type",
                    "x-request-id",
                    "x-api-key",
                    "anthropic-version",
                    "last-event-id",
                ])
                .expose_headers(["x-request-id", "retry-after", sse::STREAM_ID_HEADER])
                .max_age(600),
        ),
    );
    endpoints
        .around(move |same_origin, request| {
            let cross_origin = cross_origin.clone();
            let origins = origins.clone();
            async move {
                let header = |name| request.headers().get(name).and_then(|v| v.to_str().ok());
                let marks = origin::BrowserMarks {
                    origin: header("origin"),
                    fetch_site: header("sec-fetch-site"),
                    // HTTP/2 replaces `Host` with `:authority`, which hyper puts in the URI.
                    host: request
                        .uri()
                        .authority()
                        .map(|authority| authority.as_str())
                        .or_else(|| header("host")),
                };
                let api = routes::route_of(request.uri().path())
                    .is_some_and(|route| route.access == Access::Api);
                match origins.classify(marks, api) {
                    Ok(origin::Origin::Same) => same_origin.call(request).await,
                    Ok(origin::Origin::Cross) => cross_origin.call(request).await,
                    Err(err) => Ok(routes::error_shape(request.uri().path())(&err)),
                }
            }
        })
        .with(RequestId {
            route_label: routes::label,
        })
        .into_endpoint()
        .boxed()
}

/// Every error in its route's shape (the gateway's own: `{"error": {"code", "message"}}`),
/// with the `Allow` header a 405 owes.
fn error_response(err: &poem::Error, path: &str) -> Response {
    let error = Error::from_poem(err);
    let mut response = routes::error_shape(path)(&error);
    if let Error::MethodNotAllowed(_) = error
        && let Some(route) = routes::route_of(path)
    {
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static(route.allow));
    }
    response
}

/// Swagger UI.
fn docs() -> BoxEndpoint<'static> {
    api_service().swagger_ui().map_to_response().boxed()
}

/// The OpenAPI document.
fn openapi_document() -> BoxEndpoint<'static> {
    api_service().spec_endpoint().map_to_response().boxed()
}

/// Prometheus text format. Its labels name the API keys, so it is behind a key like the API.
fn metrics() -> BoxEndpoint<'static> {
    #[handler]
    fn render(Data(state): Data<&Arc<AppState>>) -> String {
        state.metrics.render()
    }
    get(render).boxed()
}

/// Checks the key of every API request from its headers (or its `api_key` parameter),
/// before anything reads its body, and hands the handlers the [`Caller`].
async fn require_key<E: Endpoint>(
    next: E,
    mut request: Request,
    state: Arc<AppState>,
) -> poem::Result<Response> {
    if routes::route_of(request.uri().path()).is_some_and(|route| route.access == Access::Api) {
        let caller = state.gateway.auth.authenticate(&request)?;
        request.extensions_mut().insert(caller);
    }
    next.call(request).await.map(IntoResponse::into_response)
}

/// How request bodies are read.
#[derive(Debug, Clone, Copy)]
struct BodyRules {
    max_bytes: usize,
    /// From the request's arrival to its body's last byte.
    read_timeout: Duration,
}

/// Refuses bodies over the limit with 413, whether or not they announce their length (at
/// once when they announce it), bodies not sent within the read timeout with 408, and
/// encoded bodies with 415. Nothing is read here: the body is wrapped so that whoever reads
/// it gets the error, and nothing more than the limit is ever buffered.
async fn limit_body<E: Endpoint>(
    next: E,
    mut request: Request,
    rules: BodyRules,
) -> poem::Result<Response> {
    let headers = request.headers();
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
    let has_body = declared.is_some_and(|length| length > 0)
        || headers.contains_key(header::TRANSFER_ENCODING);
    if has_body {
        if let Some(encoding) = headers
            .get(header::CONTENT_ENCODING)
            .map(|value| value.to_str().unwrap_or_default().trim())
            .filter(|encoding| !encoding.eq_ignore_ascii_case("identity"))
        {
            return Err(Error::UnsupportedMediaType(format!(
                "request bodies are read as sent: `Content-Encoding: {}` is not supported",
                encoding.escape_debug()
            ))
            .into());
        }
        if declared.is_some_and(|length| length > rules.max_bytes as u64) {
            return Err(rules.too_large().into());
        }
        let body = request.take_body();
        request.set_body(rules.bound(body));
    }
    next.call(request).await.map(IntoResponse::into_response)
}

impl BodyRules {
    fn too_large(&self) -> Error {
        Error::TooLarge(format!("the request body is over {} bytes", self.max_bytes))
    }

    /// `body`, ending with an error (our [`Error`] inside an `io::Error`) once it is over
    /// the limit or late.
    fn bound(self, body: poem::Body) -> poem::Body {
        let deadline = tokio::time::Instant::now() + self.read_timeout;
        let mut chunks = Box::pin(body.into_bytes_stream());
        let mut read = 0usize;
        let bounded = async_stream::stream! {
            loop {
                let next = match tokio::time::timeout_at(deadline, chunks.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        yield Err(std::io::Error::other(Error::RequestTimeout(format!(
                            "the request body did not arrive within {:?} (body_read_timeout)",
                            self.read_timeout
                        ))));
                        return;
                    }
                };
                match next {
                    Some(Ok(bytes)) => {
                        read = read.saturating_add(bytes.len());
                        if read > self.max_bytes {
                            yield Err(std::io::Error::other(self.too_large()));
                            return;
                        }
                        yield Ok(bytes);
                    }
                    Some(Err(err)) => {
                        yield Err(err);
                        return;
                    }
                    None => return,
                }
            }
        };
        poem::Body::from_bytes_stream(bounded)
    }
}

/// Binds `listen` and serves until SIGTERM or SIGINT; then drains: new work is refused
/// with 503 (and `/healthz` says `draining`, so load balancers move on) while the work in
/// flight has `shutdown_grace` to finish; what is left then is ended, and the server stops.
/// A second signal ends the process at once.
pub async fn serve(
    listen: &str,
    connections: &ConnectionSettings,
    state: impl FnOnce(SocketAddr) -> AppState,
) -> std::io::Result<()> {
    let limits = connection::ConnectionLimits::new(connections);
    let acceptor = connection::WatchedAcceptor::new(bind(listen).await?, limits);
    let bound = acceptor
        .local_addr()
        .iter()
        .find_map(|addr| addr.as_socket_addr().copied())
        .ok_or_else(|| std::io::Error::other("the listener has no socket address"))?;
    tracing::info!(
        addr = %bound,
        max_connections = limits.max_connections,
        "modelgate listening on http://{bound}"
    );
    let state = state(bound);
    let gateway = state.gateway.clone();
    let grace = gateway.settings.shutdown_grace;
    let stop = {
        let gateway = gateway.clone();
        async move {
            shutdown_signal().await;
            tracing::info!(
                ?grace,
                "draining: refusing new work, letting work in flight finish (a second signal stops at once)"
            );
            tokio::spawn(async {
                shutdown_signal().await;
                tracing::warn!("second signal: stopping at once, ending the work in flight");
                std::process::exit(FORCED_EXIT_CODE);
            });
            gateway.shutdown.drain(grace).await;
        }
    };
    let app = app(state).with(acceptor.tokens());
    poem::Server::new_with_acceptor(acceptor)
        .http2_max_concurrent_streams(connections.http2_max_concurrent_streams)
        .run_with_graceful_shutdown(app, stop, Some(CLOSE_MARGIN))
        .await?;
    // WebSocket sessions live outside the HTTP connections the server waited for.
    let _ = tokio::time::timeout(CLOSE_MARGIN, gateway.shutdown.work.wait()).await;
    tracing::info!("stopped");
    Ok(())
}

/// Binds `listen` with Nagle's algorithm off. Accepted connections inherit TCP_NODELAY from
/// the listener (Linux), so every SSE event and WebSocket frame leaves at once instead of
/// waiting for the client's ACK of the one before.
async fn bind(listen: &str) -> std::io::Result<TcpAcceptor> {
    let addr = tokio::net::lookup_host(listen)
        .await?
        .next()
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to listen on")
        })?;
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    TcpAcceptor::from_tokio(socket.listen(1024)?)
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("installing a SIGTERM handler cannot fail on Unix");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!("signal received");
}
