//! The mapping of the SDK's errors and Bedrock's exceptions to the gateway's [`Error`].

use aws_sdk_bedrockruntime::{
    config::http::HttpResponse,
    error::{ProvideErrorMetadata, SdkError},
};
use aws_smithy_types::event_stream::RawMessage;

use crate::error::Error;

/// Maps a failed InvokeModelWithResponseStream call (before any answer).
pub fn request_error<E>(err: SdkError<E, HttpResponse>, model: &str) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match &err {
        SdkError::ServiceError(service) => {
            exception(service.err().code(), service.err().message(), model)
        }
        SdkError::TimeoutError(_) => Error::UpstreamTimeout(format!(
            "Bedrock did not answer in time for model `{model}`"
        )),
        _ => transport_error(&err, model),
    }
}

/// Maps an error received in the middle of a response stream (InvokeModelWithResponseStream's
/// or ConverseStream's).
pub fn stream_error<E>(err: SdkError<E, RawMessage>, model: &str) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match &err {
        SdkError::ServiceError(service) => {
            // The frame's `:exception-type` names the exception, modeled by the operation
            // or not (ConverseStream does not model `modelTimeoutException`).
            let name = header(service.raw(), ":exception-type");
            exception(
                name.as_deref().or(service.err().code()),
                service.err().message(),
                model,
            )
        }
        // An unmodeled `:message-type error` frame: the SDK cannot unmarshal it, but the raw
        // frame still carries Bedrock's code and message.
        SdkError::ResponseError(response) => match header(response.raw(), ":error-code") {
            Some(code) => exception(
                Some(&code),
                header(response.raw(), ":error-message").as_deref(),
                model,
            ),
            None => transport_error(&err, model),
        },
        // The answer had begun: whatever broke the connection, the answer is broken.
        SdkError::DispatchFailure(_) => Error::Upstream(format!(
            "the connection to Bedrock broke in the middle of model `{model}`'s answer: {}",
            error_chain(&err)
        )),
        _ => transport_error(&err, model),
    }
}

/// A string header of an event-stream frame.
fn header(raw: &RawMessage, name: &str) -> Option<String> {
    let RawMessage::Decoded(message) = raw else {
        return None;
    };
    message
        .headers()
        .iter()
        .find(|header| header.name().as_str() == name)
        .and_then(|header| header.value().as_string().ok())
        .map(|value| value.as_str().to_owned())
}

/// Errors below the service: connection refused or lost, credentials missing, timeouts.
fn transport_error<E, R>(err: &SdkError<E, R>, model: &str) -> Error
where
    E: std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
{
    if let Some(credentials) =
        find_source::<aws_credential_types::provider::error::CredentialsError>(err)
    {
        // The chain's own message is terse ("an error occurred while loading
        // credentials"): its sources say why (STS refusing a role, an expired SSO token).
        return Error::UpstreamUnavailable(no_credentials(model, error_chain(credentials)));
    }
    match err {
        SdkError::TimeoutError(_) => Error::UpstreamTimeout(format!(
            "Bedrock did not answer in time for model `{model}`"
        )),
        SdkError::DispatchFailure(failure) if failure.is_timeout() => Error::UpstreamTimeout(
            format!("Bedrock did not answer in time for model `{model}`"),
        ),
        SdkError::DispatchFailure(failure) if failure.is_io() => {
            Error::UpstreamUnavailable(format!(
                "the connection to Bedrock failed for model `{model}`: {}",
                error_chain(err)
            ))
        }
        _ => Error::Upstream(format!(
            "Bedrock call for model `{model}` failed: {}",
            error_chain(err)
        )),
    }
}

/// What a request (503) and `GET /models` say when the credential chain found nothing.
pub fn no_credentials(model: &str, cause: impl std::fmt::Display) -> String {
    format!(
        "the gateway has no usable AWS credentials for model `{model}` ({cause}); \
         provide them through the standard AWS chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, \
         AWS_PROFILE, SSO or an instance role)"
    )
}

/// "outer: inner: root cause", without the SDK's debug dump.
pub(super) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current = Some(err);
    while let Some(err) = current {
        let part = err.to_string();
        if !parts.last().is_some_and(|last| last.contains(&part)) {
            parts.push(part);
        }
        current = err.source();
    }
    parts.join(": ")
}

fn find_source<'a, T: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut current = Some(err);
    while let Some(err) = current {
        if let Some(found) = err.downcast_ref::<T>() {
            return Some(found);
        }
        current = err.source();
    }
    None
}

/// The geographies of Bedrock's cross-region inference profile ids.
const PROFILE_PREFIXES: [&str; 4] = ["us", "eu", "apac", "global"];

/// Maps a Bedrock exception, named as in its API (any case), to the gateway's error.
fn exception(name: Option<&str>, message: Option<&str>, model: &str) -> Error {
    let name = name.unwrap_or("UnknownException");
    let message = message.unwrap_or("no message");
    match name.to_ascii_lowercase().as_str() {
        "throttlingexception" | "servicequotaexceededexception" | "modelnotreadyexception" => {
            Error::Throttled(format!(
                "Bedrock is throttling model `{model}` ({name}: {message}); retry after a pause"
            ))
        }
        "validationexception" if message.contains("inference profile") => {
            // "Invocation of model ID <id> with on-demand throughput isn't supported. …"
            let profiles = match message
                .split_once("model ID ")
                .and_then(|(_, rest)| rest.split_whitespace().next())
            {
                Some(id) => PROFILE_PREFIXES
                    .map(|prefix| format!("`{prefix}.{id}`"))
                    .join(", "),
                None => "`us.<model id>`".to_owned(),
            };
            Error::InvalidRequest(format!(
                "Bedrock rejected the request for model `{model}`: {message}. This model must be \
                 called through an inference profile: set its `model_id` to a profile id that \
                 your account and region can use, such as {profiles}, or to the profile's ARN"
            ))
        }
        "validationexception" => Error::InvalidRequest(format!(
            "Bedrock rejected the request for model `{model}`: {message}"
        )),
        "serviceunavailableexception" => Error::UpstreamUnavailable(format!(
            "Bedrock is unavailable for model `{model}`: {message}"
        )),
        "modeltimeoutexception" => {
            Error::UpstreamTimeout(format!("model `{model}` timed out on Bedrock: {message}"))
        }
        "accessdeniedexception" => Error::Upstream(format!(
            "Bedrock denied access to model `{model}`: {message}. Check that the gateway's AWS \
             identity may call bedrock:InvokeModel and that model access is granted in this region"
        )),
        "unrecognizedclientexception"
        | "invalidsignatureexception"
        | "expiredtokenexception"
        | "missingauthenticationtokenexception" => Error::Upstream(format!(
            "Bedrock refused the gateway's AWS credentials for model `{model}` ({name}: {message}); \
             check or renew them"
        )),
        _ => Error::Upstream(format!(
            "Bedrock failed for model `{model}` ({name}: {message})"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exceptions_map_to_the_documented_codes_whatever_their_case() {
        let code = |name: &str| exception(Some(name), Some("m"), "llama3").code();
        assert_eq!(code("ThrottlingException"), "throttled");
        assert_eq!(code("throttlingException"), "throttled");
        assert_eq!(code("ServiceQuotaExceededException"), "throttled");
        assert_eq!(code("ModelNotReadyException"), "throttled");
        assert_eq!(code("validationException"), "invalid_request");
        assert_eq!(code("ServiceUnavailableException"), "upstream_unavailable");
        assert_eq!(code("modelTimeoutException"), "upstream_timeout");
        assert_eq!(code("AccessDeniedException"), "upstream_error");
        assert_eq!(code("ResourceNotFoundException"), "upstream_error");
        assert_eq!(code("modelStreamErrorException"), "upstream_error");
        assert_eq!(code("InternalServerException"), "upstream_error");
    }

    #[test]
    fn a_bare_id_that_needs_an_inference_profile_says_how_to_fix_it() {
        let err = exception(
            Some("ValidationException"),
            Some(
                "Invocation of model ID meta.llama3-2-1b-instruct-v1:0 with on-demand throughput isn't supported. Retry your request with the ID or ARN of an inference profile that contains this model.",
            ),
            "small",
        );
        assert!(
            err.to_string().contains(
                "`us.meta.llama3-2-1b-instruct-v1:0`, `eu.meta.llama3-2-1b-instruct-v1:0`"
            ),
            "{err}"
        );
    }
}
