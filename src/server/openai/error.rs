//! OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`, for every error of
//! the `/v1` OpenAI routes, with the statuses its SDKs map to their exception classes (400
//! `BadRequestError`, 401 `AuthenticationError`, 403 `PermissionDeniedError`, 404
//! `NotFoundError`, 429 `RateLimitError`, 5xx `InternalServerError`).

use poem::{Response, error::ResponseError, http::StatusCode};
use poem_openapi::{
    ApiResponse, Object,
    registry::{MetaResponses, Registry},
    types::{ToJSON, Type},
};

use crate::error::Error;

#[derive(Debug, Clone, Object)]
#[oai(rename = "OpenAiErrorBody")]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "OpenAiErrorDetail")]
pub struct ErrorDetail {
    /// What went wrong and, where the client can do something about it, what to do.
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `permission_error`,
    /// `rate_limit_error` or `server_error`.
    #[oai(rename = "type")]
    pub kind: String,
    /// The request field at fault, where there is one.
    #[oai(nullable)]
    pub param: Option<String>,
    /// The gateway's stable error code (`GET /openapi.json` lists them), but
    /// `model_not_found` and `invalid_api_key` as OpenAI names those.
    #[oai(nullable)]
    pub code: Option<String>,
}

impl ErrorBody {
    pub fn of(err: &Error) -> ErrorBody {
        let message = err.to_string();
        let status = err.status();
        let kind = match status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            status if status.is_server_error() => "server_error",
            _ => "invalid_request_error",
        };
        let (code, param) = match err {
            Error::UnknownModel(_) => ("model_not_found", Some("model".to_owned())),
            Error::Unauthorized(_) => ("invalid_api_key", None),
            Error::InvalidRequest(_) | Error::TooLarge(_) => (err.code(), field_named(&message)),
            _ => (err.code(), None),
        };
        ErrorBody {
            error: ErrorDetail {
                message,
                kind: kind.to_owned(),
                param,
                code: Some(code.to_owned()),
            },
        }
    }
}

/// The field a validation message names: first, in backquotes ("`temperature` must be …"),
/// or later in parentheses ("… cannot take `image` blocks (`messages[0].content[1]`); …").
fn field_named(message: &str) -> Option<String> {
    let is_path = |field: &str| {
        !field.is_empty()
            && field
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '[' | ']'))
    };
    let leading = message
        .strip_prefix('`')
        .and_then(|rest| rest.split('`').next());
    let in_parentheses = message
        .split_once("(`")
        .and_then(|(_, rest)| rest.split_once("`)"))
        .map(|(field, _)| field);
    leading
        .filter(|field| is_path(field))
        .or(in_parentheses.filter(|field| is_path(field)))
        .map(str::to_owned)
}

/// An error response of the OpenAI routes: the gateway's status and headers
/// (`Retry-After`, `WWW-Authenticate`), OpenAI's body.
pub fn error_response(err: &Error) -> Response {
    let mut response = err.as_response();
    response.set_body(ErrorBody::of(err).to_json_string());
    response
}

/// A handler's error, documented with OpenAI's body.
pub struct OpenAiError(pub Error);

impl From<Error> for OpenAiError {
    fn from(err: Error) -> Self {
        OpenAiError(err)
    }
}

impl From<OpenAiError> for poem::Error {
    fn from(err: OpenAiError) -> Self {
        err.0.into()
    }
}

/// The statuses and codes of [`Error`]'s own documentation, with OpenAI's body.
impl ApiResponse for OpenAiError {
    fn meta() -> MetaResponses {
        let mut meta = Error::meta();
        for response in &mut meta.responses {
            for content in &mut response.content {
                content.schema = ErrorBody::schema_ref();
            }
        }
        meta
    }

    fn register(registry: &mut Registry) {
        ErrorBody::register(registry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(err: Error) -> serde_json::Value {
        ErrorBody::of(&err).to_json().unwrap()
    }

    #[test]
    fn validation_errors_name_the_field_they_begin_with() {
        assert_eq!(
            body(Error::InvalidRequest(
                "`temperature` must be between 0 and 1, got 1.5".into()
            ))["error"],
            serde_json::json!({
                "message": "`temperature` must be between 0 and 1, got 1.5",
                "type": "invalid_request_error",
                "param": "temperature",
                "code": "invalid_request",
            })
        );
        let not_a_field = body(Error::InvalidRequest(
            "model `x y` cannot take `tools`".into(),
        ));
        assert_eq!(not_a_field["error"]["param"], serde_json::Value::Null);
        let at_the_end = body(Error::InvalidRequest(
            "model `m` cannot take `image` blocks (`messages[0].content[1]`); models … can".into(),
        ));
        assert_eq!(at_the_end["error"]["param"], "messages[0].content[1]");
    }

    #[test]
    fn an_unknown_model_and_a_bad_key_are_named_as_openai_names_them() {
        let unknown = body(Error::UnknownModel("gpt-9".into()));
        assert_eq!(unknown["error"]["code"], "model_not_found");
        assert_eq!(unknown["error"]["param"], "model");
        let unauthorized = body(Error::Unauthorized("no key".into()));
        assert_eq!(unauthorized["error"]["type"], "authentication_error");
        assert_eq!(unauthorized["error"]["code"], "invalid_api_key");
    }

    #[test]
    fn the_response_keeps_the_status_and_retry_after() {
        let response = error_response(&Error::RateLimited {
            message: "wait".into(),
            retry_after_secs: 7,
        });
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()["Retry-After"], "7");
    }
}
