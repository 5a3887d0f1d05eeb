//! A JSON request body parsed by serde, described in the OpenAPI document by its
//! poem-openapi schema: serde's errors name the field at fault ("missing field `model`",
//! "unknown field `max_token`, expected one of …"), which poem-openapi's own parser does not.

use poem::{Request, RequestBody, error::ReadBodyError};
use poem_openapi::error::ParseRequestPayloadError;
use poem_openapi::{
    impl_apirequest_for_payload,
    payload::{ParsePayload, Payload},
    registry::{MetaSchemaRef, Registry},
    types::Type,
};
use serde::de::DeserializeOwned;

use crate::error::Error;

pub struct JsonBody<T>(pub T);

impl<T: Type> Payload for JsonBody<T> {
    const CONTENT_TYPE: &'static str = "application/json; charset=utf-8";

    fn check_content_type(content_type: &str) -> bool {
        content_type.parse::<mime::Mime>().is_ok_and(|mime| {
            mime.type_() == "application"
                && (mime.subtype() == "json"
                    || mime.suffix().is_some_and(|suffix| suffix == "json"))
        })
    }

    fn schema_ref() -> MetaSchemaRef {
        T::schema_ref()
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }
}

impl<T: Type + DeserializeOwned> ParsePayload for JsonBody<T> {
    const IS_REQUIRED: bool = true;

    async fn from_request(_request: &Request, body: &mut RequestBody) -> poem::Result<Self> {
        let bytes = body.take()?.into_bytes().await.map_err(read_error)?;
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|err| {
            ParseRequestPayloadError {
                reason: err.to_string(),
            }
            .into()
        })
    }
}

/// The error the body's reader met: the limit or the timeout of `limit_body` (our error,
/// inside an `io::Error`, maybe inside another), or a connection that broke.
fn read_error(err: ReadBodyError) -> poem::Error {
    let ours = match &err {
        ReadBodyError::Io(io) => ours(io),
        _ => None,
    };
    ours.unwrap_or_else(|| Error::InvalidRequest(format!("cannot read the request body: {err}")))
        .into()
}

fn ours(err: &(dyn std::error::Error + 'static)) -> Option<Error> {
    if let Some(ours) = err.downcast_ref::<Error>() {
        return Some(ours.clone());
    }
    ours(err.downcast_ref::<std::io::Error>()?.get_ref()?)
}

impl_apirequest_for_payload!(JsonBody<T>, T: Type + DeserializeOwned);
