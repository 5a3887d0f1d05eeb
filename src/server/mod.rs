//! The web server: routes, shared state, and the one place where errors become responses.

mod api;
mod events;
mod origin;
mod ws;

use std::sync::Arc;

use poem::{
    Endpoint, EndpointExt, IntoEndpoint, IntoResponse, Request, Response, Route,
    endpoint::BoxEndpoint,
    error::{ReadBodyError, ResponseError},
    get,
    http::header,
    listener::{Acceptor, Listener, TcpListener},
};
use poem_openapi::OpenApiService;

pub use origin::OriginPolicy;

use crate::{error::Error, registry::Registry, telemetry::RequestId};

/// Largest request body accepted, in bytes.
const MAX_BODY_BYTES: usize = 1024 * 1024;

pub struct AppState {
    pub registry: Arc<Registry>,
    pub origins: OriginPolicy,
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
    Route::new()
        .at("/ws/model", get(ws::ws_model))
        .nest("/docs", docs)
        .at("/openapi.json", spec)
        .nest("/", api)
        .around(limit_body)
        .data(Arc::new(state))
        .catch_all_error(|err| async move { Error::from_poem(&err).as_response() })
        .with(RequestId)
        .into_endpoint()
        .boxed()
}

/// Refuses bodies over [`MAX_BODY_BYTES`] with 413, whether or not they announce their length.
async fn limit_body<E: Endpoint>(next: E, mut request: Request) -> poem::Result<Response> {
    let too_large = || Error::TooLarge(format!("the request body is over {MAX_BODY_BYTES} bytes"));
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<usize>().ok());
    match declared {
        Some(length) if length > MAX_BODY_BYTES => return Err(too_large().into()),
        Some(_) => {}
        None if request.headers().contains_key(header::TRANSFER_ENCODING) => {
            let body = request
                .take_body()
                .into_bytes_limit(MAX_BODY_BYTES)
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

/// Binds `listen` and serves until the process is stopped.
pub async fn serve(listen: &str, state: AppState) -> std::io::Result<()> {
    let acceptor = TcpListener::bind(listen).into_acceptor().await?;
    for addr in acceptor.local_addr() {
        if let Some(addr) = addr.as_socket_addr() {
            tracing::info!(%addr, "modelgate listening on http://{addr}");
        }
    }
    poem::Server::new_with_acceptor(acceptor)
        .run_with_graceful_shutdown(app(state), shutdown_signal(), None)
        .await
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
    tracing::info!("shutting down");
}
