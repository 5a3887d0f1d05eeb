//! The web server: routes, shared state, and the one place where errors become responses.

mod api;
mod connection;
mod events;
mod json_body;
mod origin;
mod sse;
mod ui;
mod ws;

use std::{sync::Arc, time::Duration};

use metrics_exporter_prometheus::PrometheusHandle;
use poem::{
    Endpoint, EndpointExt, IntoEndpoint, IntoResponse, Request, Response, Route,
    endpoint::BoxEndpoint,
    error::{ReadBodyError, ResponseError},
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

/// How long, after draining, the server waits for connections to close by themselves.
const CLOSE_MARGIN: Duration = Duration::from_secs(5);
/// Exit status when a second SIGTERM/SIGINT cuts the drain short.
const FORCED_EXIT_CODE: i32 = 1;

pub struct AppState {
    pub gateway: Arc<Gateway>,
    pub origins: OriginPolicy,
    pub metrics: PrometheusHandle,
}

fn api_service() -> OpenApiService<api::Api, ()> {
    OpenApiService::new(api::Api, "modelgate", env!("CARGO_PKG_VERSION")).description(
        "A streaming gateway in front of large language models. `POST /invoke` answers \
             with the whole text; `/stream` streams it as Server-Sent Events; `/ws/model` \
             streams over WebSocket (see the README).",
    )
}

/// The OpenAPI document, as `modelgate openapi` prints it and `/openapi.json` serves it.
pub fn openapi_json() -> String {
    api_service().spec()
}

pub fn app(state: AppState) -> BoxEndpoint<'static> {
    let api = api_service();
    let docs = api.swagger_ui();
    let spec = api.spec_endpoint();
    let max_body_bytes = state.gateway.settings.max_body_bytes;
    let origins = state.origins.clone();
    let routes = Arc::new(
        Route::new()
            .at("/ui/:file", get(ui::asset))
            .at("/ws/model", get(ws::ws_model))
            .at("/metrics", get(metrics))
            .nest("/docs", docs)
            .at("/openapi.json", spec)
            .nest("/", api)
            .around(ui::page_at_root)
            .around(move |next, request| limit_body(next, request, max_body_bytes))
            .data(Arc::new(state))
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
        routes.clone().with(
            Cors::new()
                .allow_origins_fn(|_| true)
                .allow_methods([Method::GET, Method::POST])
                .allow_headers(["authorization", "content-type", "x-request-id"])
                .expose_headers(["x-request-id", "retry-after"])
                .max_age(600),
        ),
    );
    routes
        .around(move |same_origin, request| {
            let cross_origin = cross_origin.clone();
            let origins = origins.clone();
            async move {
                let header = |name| request.headers().get(name).and_then(|v| v.to_str().ok());
                match origins.classify(header(header::ORIGIN), header(header::HOST)) {
                    Ok(origin::Origin::Same) => same_origin.call(request).await,
                    Ok(origin::Origin::Cross) => cross_origin.call(request).await,
                    Err(err) => Ok(err.as_response()),
                }
            }
        })
        .with(RequestId)
        .into_endpoint()
        .boxed()
}

/// Every error as `{"error": {"code", "message"}}`, with the `Allow` header a 405 owes.
fn error_response(err: &poem::Error, path: &str) -> Response {
    let error = Error::from_poem(err);
    let mut response = error.as_response();
    if let Error::MethodNotAllowed(_) = error {
        let allowed = match path {
            "/invoke" => "POST",
            "/stream" => "GET, POST",
            _ => "GET",
        };
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static(allowed));
    }
    response
}

/// Prometheus text format.
#[handler]
fn metrics(Data(state): Data<&Arc<AppState>>) -> String {
    state.metrics.render()
}

/// Refuses bodies over `limit` bytes with 413, whether or not they announce their length.
async fn limit_body<E: Endpoint>(
    next: E,
    mut request: Request,
    limit: usize,
) -> poem::Result<Response> {
    let too_large = || Error::TooLarge(format!("the request body is over {limit} bytes"));
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<usize>().ok());
    match declared {
        Some(length) if length > limit => return Err(too_large().into()),
        Some(_) => {}
        None if request.headers().contains_key(header::TRANSFER_ENCODING) => {
            let body =
                request
                    .take_body()
                    .into_bytes_limit(limit)
                    .await
                    .map_err(|err| match err {
                        ReadBodyError::PayloadTooLarge => too_large(),
                        other => {
                            Error::InvalidRequest(format!("cannot read the request body: {other}"))
                        }
                    })?;
            request.set_body(body);
        }
        None => {}
    }
    next.call(request).await.map(IntoResponse::into_response)
}

/// Binds `listen` and serves until SIGTERM or SIGINT; then drains: new work is refused
/// with 503 (and `/healthz` says `draining`, so load balancers move on) while the work in
/// flight has `shutdown_grace` to finish; what is left then is ended, and the server stops.
/// A second signal ends the process at once.
pub async fn serve(
    listen: &str,
    state: AppState,
    connections: &ConnectionSettings,
) -> std::io::Result<()> {
    let limits = connection::ConnectionLimits::new(connections);
    let acceptor = connection::WatchedAcceptor::new(bind(listen).await?, limits);
    for addr in acceptor.local_addr() {
        if let Some(addr) = addr.as_socket_addr() {
            tracing::info!(
                %addr,
                max_connections = limits.max_connections,
                "modelgate listening on http://{addr}"
            );
        }
    }
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
