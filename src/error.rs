//! The one error type of the gateway and its single mapping to what clients see:
//! HTTP status + JSON body, SSE `error` event, WebSocket frame.

use poem::{Response, http::StatusCode};
use poem_openapi::{
    ApiResponse, Object,
    registry::{MetaHeader, MetaMediaType, MetaResponse, MetaResponses, Registry},
    types::{ToJSON, Type},
};
use strum::IntoEnumIterator;

/// Seconds a throttled client is told to wait before retrying.
const THROTTLE_RETRY_AFTER_SECS: u64 = 2;
/// Seconds a client is told to wait when the upstream is unavailable.
const UNAVAILABLE_RETRY_AFTER_SECS: u64 = 5;
/// Seconds a client is told to wait while a local model is being fetched or loaded.
const LOADING_RETRY_AFTER_SECS: u64 = 5;

/// Every code the API can emit is a variant; [`Error::mapping`] gives each its status, its
/// code and what it means, and the OpenAPI document lists them all ([`strum::EnumIter`]).
#[derive(Debug, Clone, thiserror::Error, strum::EnumIter)]
pub enum Error {
    /// The request itself is wrong; nothing was sent upstream.
    #[error("{0}")]
    InvalidRequest(String),
    #[error("unknown model `{0}`: GET /models lists the models this gateway serves")]
    UnknownModel(String),
    /// A route that does not exist (not a model).
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    TooLarge(String),
    /// The client did not send its whole request body within `body_read_timeout`.
    #[error("{0}")]
    RequestTimeout(String),
    /// A request body in an encoding (`Content-Encoding`) or media type the gateway does not read.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// No API key, or one the gateway does not know.
    #[error("{0}")]
    Unauthorized(String),
    /// A browser origin the gateway does not serve.
    #[error("{0}")]
    Forbidden(String),
    /// The upstream is throttling.
    #[error("{0}")]
    Throttled(String),
    /// The caller's API key is over one of its limits; retry after this many seconds.
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after_secs: u64,
    },
    /// The caller's API key has used its `tokens_per_day` or `tokens_per_month`; retry after
    /// this many seconds (the budget's reset).
    #[error("{message}")]
    BudgetExhausted {
        message: String,
        retry_after_secs: u64,
    },
    /// The shared per-key limits (Redis) cannot be checked and `on_redis_error = "deny"`.
    #[error("{0}")]
    LimitsUnavailable(String),
    /// The upstream answered with an error that is not the client's fault.
    #[error("{0}")]
    Upstream(String),
    /// The upstream cannot be reached or used right now (network, credentials, outage).
    #[error("{0}")]
    UpstreamUnavailable(String),
    #[error("{0}")]
    UpstreamTimeout(String),
    /// The gateway is stopping: new work is refused, work in flight ended at the grace period.
    #[error("the gateway is shutting down; retry on another instance")]
    ShuttingDown,
    /// The client left before its answer was ready; nobody receives this one.
    #[error("the client closed the connection")]
    ClientClosed,
    /// The client stopped the generation (`{"type":"cancel"}` on a WebSocket).
    #[error("the generation was cancelled at the client's request")]
    Cancelled,
    /// A local model is still being fetched or loaded.
    #[error("{0}")]
    ModelLoading(String),
    /// A resume (`Last-Event-ID`, a WebSocket `resume`) asks for events the gateway no
    /// longer holds; the message says why (window over, a cap, resumption off).
    #[error("{0}")]
    ResumeExpired(String),
    /// A resume names a stream that another API key started.
    #[error("{0}")]
    UnknownStream(String),
    /// Every client connection the gateway holds is busy; only `/healthz` is answered.
    #[error("the gateway is at its limit of {0} client connections, all busy; retry shortly")]
    Overloaded(usize),
}

/// What a client is told about an error: its HTTP status, its stable code, and what it means
/// (the OpenAPI document's words).
pub struct Mapping {
    pub status: StatusCode,
    pub code: &'static str,
    pub meaning: &'static str,
}

const fn map(status: StatusCode, code: &'static str, meaning: &'static str) -> Mapping {
    Mapping {
        status,
        code,
        meaning,
    }
}

/// nginx's "client closed request": never sent, only logged and counted.
const CLIENT_CLOSED_REQUEST: StatusCode = match StatusCode::from_u16(499) {
    Ok(status) => status,
    Err(_) => panic!("499 is a valid status"),
};

impl Error {
    /// The one mapping from errors to what clients see.
    pub fn mapping(&self) -> Mapping {
        match self {
            Error::InvalidRequest(_) => map(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the request is malformed or out of range",
            ),
            Error::UnknownModel(_) => map(
                StatusCode::NOT_FOUND,
                "unknown_model",
                "no model of that name",
            ),
            Error::NotFound(_) => map(StatusCode::NOT_FOUND, "not_found", "no such route"),
            Error::MethodNotAllowed(_) => map(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "the route does not answer this method (`Allow` lists those it does)",
            ),
            Error::TooLarge(_) => map(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "the request body is over the limit",
            ),
            Error::RequestTimeout(_) => map(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                "the request body did not arrive within `body_read_timeout`",
            ),
            Error::UnsupportedMediaType(_) => map(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "a body that is not JSON, or in a `Content-Encoding` other than `identity`",
            ),
            Error::Unauthorized(_) => map(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a missing or unknown API key",
            ),
            Error::Forbidden(_) => map(
                StatusCode::FORBIDDEN,
                "forbidden",
                "the browser origin is not allowed",
            ),
            Error::Throttled(_) => map(
                StatusCode::TOO_MANY_REQUESTS,
                "throttled",
                "the upstream is throttling, retry later",
            ),
            Error::RateLimited { .. } => map(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "the API key is over one of its limits, retry after `Retry-After` seconds",
            ),
            Error::BudgetExhausted { .. } => map(
                StatusCode::TOO_MANY_REQUESTS,
                "budget_exhausted",
                "the API key has used its token budget of the day or month, retry after `Retry-After` seconds (its reset)",
            ),
            Error::LimitsUnavailable(_) => map(
                StatusCode::SERVICE_UNAVAILABLE,
                "limits_unavailable",
                "the shared per-key limits cannot be checked (Redis is unreachable and `on_redis_error` is `deny`)",
            ),
            Error::Upstream(_) => map(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                "the upstream model failed",
            ),
            Error::UpstreamUnavailable(_) => map(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream_unavailable",
                "the upstream cannot be reached or used",
            ),
            Error::UpstreamTimeout(_) => map(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                "the upstream did not answer in time",
            ),
            Error::ShuttingDown => map(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the gateway is draining",
            ),
            Error::ClientClosed => map(
                CLIENT_CLOSED_REQUEST,
                "client_closed",
                "the client left before its answer (only logged and counted, never sent)",
            ),
            Error::Cancelled => map(
                CLIENT_CLOSED_REQUEST,
                "cancelled",
                "the client cancelled the generation (a WebSocket frame, never an HTTP status)",
            ),
            Error::ModelLoading(_) => map(
                StatusCode::SERVICE_UNAVAILABLE,
                "model_loading",
                "a local model is still being fetched or loaded",
            ),
            Error::ResumeExpired(_) => map(
                StatusCode::GONE,
                "resume_expired",
                "the events after the resumed one are no longer held (`resume_window` over, a cap, or resumption off): start a new stream",
            ),
            Error::UnknownStream(_) => map(
                StatusCode::NOT_FOUND,
                "unknown_stream",
                "no stream of that id was started with this API key",
            ),
            Error::Overloaded(_) => map(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "every client connection is busy",
            ),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.mapping().status
    }

    pub fn code(&self) -> &'static str {
        self.mapping().code
    }

    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Error::Throttled(_) => Some(THROTTLE_RETRY_AFTER_SECS),
            Error::RateLimited {
                retry_after_secs, ..
            }
            | Error::BudgetExhausted {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            Error::UpstreamUnavailable(_)
            | Error::LimitsUnavailable(_)
            | Error::ShuttingDown
            | Error::Overloaded(_) => Some(UNAVAILABLE_RETRY_AFTER_SECS),
            Error::ModelLoading(_) => Some(LOADING_RETRY_AFTER_SECS),
            _ => None,
        }
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code().to_owned(),
                message: self.to_string(),
            },
        }
    }

    /// Turns poem's own errors (unparsable body, unknown route, body limit, ...) into ours,
    /// so that every error a client sees has the same shape.
    pub fn from_poem(err: &poem::Error) -> Error {
        if let Some(ours) = err.downcast_ref::<Error>() {
            return ours.clone();
        }
        let message = err.to_string();
        match err.status() {
            StatusCode::NOT_FOUND => Error::NotFound(message),
            StatusCode::METHOD_NOT_ALLOWED => Error::MethodNotAllowed(message),
            StatusCode::PAYLOAD_TOO_LARGE => Error::TooLarge(message),
            StatusCode::REQUEST_TIMEOUT => Error::RequestTimeout(message),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => Error::UnsupportedMediaType(message),
            StatusCode::FORBIDDEN => Error::Forbidden(message),
            StatusCode::UNAUTHORIZED => Error::Unauthorized(message),
            _ => Error::InvalidRequest(message),
        }
    }
}

/// `{"error": {"code", "message"}}`: the body of every error response, the data of the SSE
/// `error` event and the `error` member of the WebSocket error frame.
#[derive(Debug, Clone, Object)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Object)]
pub struct ErrorDetail {
    /// Stable machine-readable code; each operation's error responses list them.
    pub code: String,
    /// What went wrong and, where the client can do something about it, what to do.
    pub message: String,
}

impl poem::error::ResponseError for Error {
    fn status(&self) -> StatusCode {
        Error::status(self)
    }

    fn as_response(&self) -> Response {
        let mut response = Response::builder()
            .status(self.status())
            .content_type("application/json; charset=utf-8")
            .body(self.body().to_json_string());
        if let Some(secs) = self.retry_after() {
            response
                .headers_mut()
                .insert("Retry-After", poem::http::HeaderValue::from(secs));
        }
        if let Error::Unauthorized(_) = self {
            response.headers_mut().insert(
                "WWW-Authenticate",
                poem::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

/// Describes, in the OpenAPI document, every error an operation can answer with: one
/// response per status, listing the codes of every variant that has it.
impl ApiResponse for Error {
    fn meta() -> MetaResponses {
        let responses = documented_statuses()
            .iter()
            .map(|documented| MetaResponse {
                description: &documented.description,
                status: Some(documented.status.as_u16()),
                status_range: None,
                content: vec![MetaMediaType {
                    content_type: "application/json; charset=utf-8",
                    schema: ErrorBody::schema_ref(),
                }],
                headers: match documented.retry_after {
                    Some(required) => vec![MetaHeader {
                        name: "Retry-After".to_owned(),
                        description: Some("Seconds to wait before retrying".to_owned()),
                        required,
                        deprecated: false,
                        schema: u64::schema_ref(),
                    }],
                    None => vec![],
                },
            })
            .collect();
        MetaResponses { responses }
    }

    fn register(registry: &mut Registry) {
        ErrorBody::register(registry);
    }
}

/// One documented error status: the codes that have it, with their meanings.
struct DocumentedStatus {
    status: StatusCode,
    description: String,
    /// Whether `Retry-After` comes with it: `Some(true)` always, `Some(false)` with some codes.
    retry_after: Option<bool>,
}

/// Every variant of [`Error`], grouped by status, made once: the descriptions live as long as
/// the program, as poem-openapi wants them.
fn documented_statuses() -> &'static [DocumentedStatus] {
    static DOCUMENTED: std::sync::OnceLock<Vec<DocumentedStatus>> = std::sync::OnceLock::new();
    DOCUMENTED.get_or_init(|| {
        let mut statuses: Vec<StatusCode> = Error::iter().map(|error| error.status()).collect();
        statuses.sort();
        statuses.dedup();
        statuses
            .into_iter()
            .map(|status| {
                let errors: Vec<Error> = Error::iter()
                    .filter(|error| error.status() == status)
                    .collect();
                let retrying = errors.iter().filter(|error| error.retry_after().is_some());
                DocumentedStatus {
                    status,
                    description: errors
                        .iter()
                        .map(|error| {
                            let mapping = error.mapping();
                            format!("`{}`: {}", mapping.code, mapping.meaning)
                        })
                        .collect::<Vec<_>>()
                        .join("; "),
                    retry_after: match retrying.count() {
                        0 => None,
                        some => Some(some == errors.len()),
                    },
                }
            })
            .collect()
    })
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use poem::error::ResponseError;

    #[test]
    fn throttled_carries_retry_after_and_json_body() {
        let response = Error::Throttled("slow down".into()).as_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()["Retry-After"], "2");
    }

    #[test]
    fn poem_errors_keep_their_status_and_get_our_code() {
        let not_found = poem::Error::from_status(StatusCode::NOT_FOUND);
        assert_eq!(Error::from_poem(&not_found).code(), "not_found");
        let ours: poem::Error = Error::UnknownModel("x".into()).into();
        assert_eq!(Error::from_poem(&ours).code(), "unknown_model");
    }

    #[test]
    fn every_code_is_in_the_documented_responses_under_its_status() {
        let documented = Error::meta().responses;
        for error in Error::iter() {
            let response = documented
                .iter()
                .find(|response| response.status == Some(error.status().as_u16()))
                .unwrap_or_else(|| panic!("no response for {}", error.status()));
            assert!(
                response
                    .description
                    .contains(&format!("`{}`", error.code())),
                "{} is not in the description of {}",
                error.code(),
                error.status()
            );
            if error.retry_after().is_some() {
                assert!(
                    !response.headers.is_empty(),
                    "{}: Retry-After",
                    error.code()
                );
            }
        }
    }

    #[test]
    fn the_response_body_is_the_body() {
        let error = Error::RateLimited {
            message: "wait".into(),
            retry_after_secs: 7,
        };
        let response = error.as_response();
        assert_eq!(response.headers()["Retry-After"], "7");
        let body = tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(response.into_body().into_string())
            .unwrap();
        assert_eq!(
            body,
            r#"{"error":{"code":"rate_limited","message":"wait"}}"#
        );
    }
}
