//! The one error type of the gateway and its single mapping to what clients see:
//! HTTP status + JSON body, SSE `error` event, WebSocket frame.

use poem::{Response, http::StatusCode};
use poem_openapi::{
    ApiResponse, Object,
    registry::{MetaHeader, MetaMediaType, MetaResponse, MetaResponses, Registry},
    types::Type,
};

/// Seconds a throttled client is told to wait before retrying.
const THROTTLE_RETRY_AFTER_SECS: u64 = 2;
/// Seconds a client is told to wait when the upstream is unavailable.
const UNAVAILABLE_RETRY_AFTER_SECS: u64 = 5;
/// Seconds a client is told to wait while a local model is being fetched or loaded.
const LOADING_RETRY_AFTER_SECS: u64 = 5;

#[derive(Debug, Clone, thiserror::Error)]
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
    #[error("{0}")]
    RateLimited(String, u64),
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
    /// A local model is still being fetched or loaded.
    #[error("{0}")]
    ModelLoading(String),
    /// Every client connection the gateway holds is busy; only `/healthz` is answered.
    #[error("the gateway is at its limit of {0} client connections, all busy; retry shortly")]
    Overloaded(usize),
}

impl Error {
    pub fn status(&self) -> StatusCode {
        match self {
            Error::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            Error::UnknownModel(_) | Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Error::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Error::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::Throttled(_) | Error::RateLimited(..) => StatusCode::TOO_MANY_REQUESTS,
            Error::Upstream(_) => StatusCode::BAD_GATEWAY,
            Error::UpstreamUnavailable(_)
            | Error::ShuttingDown
            | Error::ModelLoading(_)
            | Error::Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Error::ClientClosed => StatusCode::from_u16(499).expect("499 is a valid status"),
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidRequest(_) => "invalid_request",
            Error::UnknownModel(_) => "unknown_model",
            Error::NotFound(_) => "not_found",
            Error::MethodNotAllowed(_) => "method_not_allowed",
            Error::TooLarge(_) => "too_large",
            Error::RequestTimeout(_) => "request_timeout",
            Error::UnsupportedMediaType(_) => "unsupported_media_type",
            Error::Unauthorized(_) => "unauthorized",
            Error::Forbidden(_) => "forbidden",
            Error::Throttled(_) => "throttled",
            Error::RateLimited(..) => "rate_limited",
            Error::Upstream(_) => "upstream_error",
            Error::UpstreamUnavailable(_) => "upstream_unavailable",
            Error::UpstreamTimeout(_) => "upstream_timeout",
            Error::ShuttingDown => "shutting_down",
            Error::ClientClosed => "client_closed",
            Error::ModelLoading(_) => "model_loading",
            Error::Overloaded(_) => "overloaded",
        }
    }

    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Error::Throttled(_) => Some(THROTTLE_RETRY_AFTER_SECS),
            Error::RateLimited(_, secs) => Some(*secs),
            Error::UpstreamUnavailable(_) | Error::ShuttingDown | Error::Overloaded(_) => {
                Some(UNAVAILABLE_RETRY_AFTER_SECS)
            }
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
    /// Stable machine-readable code: `invalid_request`, `unknown_model`, `too_large`,
    /// `request_timeout`, `unsupported_media_type`, `throttled`, `upstream_error`, `upstream_unavailable`, `model_loading`, `upstream_timeout`, ...
    pub code: String,
    /// What went wrong and, where the client can do something about it, what to do.
    pub message: String,
}

impl poem::error::ResponseError for Error {
    fn status(&self) -> StatusCode {
        Error::status(self)
    }

    fn as_response(&self) -> Response {
        let body = serde_json::json!({"error": {"code": self.code(), "message": self.to_string()}});
        let mut response = Response::builder()
            .status(self.status())
            .content_type("application/json; charset=utf-8")
            .body(body.to_string());
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

/// Describes, in the OpenAPI document, every error status an operation can answer with.
impl ApiResponse for Error {
    fn meta() -> MetaResponses {
        let error_response =
            |status: u16, description: &'static str, retry_after: bool| MetaResponse {
                description,
                status: Some(status),
                status_range: None,
                content: vec![MetaMediaType {
                    content_type: "application/json; charset=utf-8",
                    schema: ErrorBody::schema_ref(),
                }],
                headers: if retry_after {
                    vec![MetaHeader {
                        name: "Retry-After".to_owned(),
                        description: Some("Seconds to wait before retrying".to_owned()),
                        required: true,
                        deprecated: false,
                        schema: u64::schema_ref(),
                    }]
                } else {
                    vec![]
                },
            };
        MetaResponses {
            responses: vec![
                error_response(
                    400,
                    "`invalid_request`: the request is malformed or out of range",
                    false,
                ),
                error_response(401, "`unauthorized`: a missing or unknown API key", false),
                error_response(403, "`forbidden`: the browser origin is not allowed", false),
                error_response(404, "`unknown_model`: no model of that name", false),
                error_response(
                    408,
                    "`request_timeout`: the request body did not arrive within `body_read_timeout`",
                    false,
                ),
                error_response(
                    413,
                    "`too_large`: the request body is over the limit",
                    false,
                ),
                error_response(
                    415,
                    "`unsupported_media_type`: a body that is not JSON, or in a `Content-Encoding` other than `identity`",
                    false,
                ),
                error_response(
                    429,
                    "`throttled`: the upstream is throttling; retry later",
                    true,
                ),
                error_response(502, "`upstream_error`: the upstream model failed", false),
                error_response(
                    503,
                    "`upstream_unavailable`: the upstream cannot be reached or used; `model_loading`: a local model is still being fetched or loaded; `shutting_down`: the gateway is draining; `overloaded`: every client connection is busy",
                    true,
                ),
                error_response(
                    504,
                    "`upstream_timeout`: the upstream did not answer in time",
                    false,
                ),
            ],
        }
    }

    fn register(registry: &mut Registry) {
        ErrorBody::register(registry);
    }
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
}
