//! A JSON request body parsed by serde, described in the OpenAPI document by its
//! poem-openapi schema: serde's errors name the field at fault ("missing field `model`",
//! "unknown field `max_token`, expected one of …"), which poem-openapi's own parser does not.

use poem::{FromRequest, Request, RequestBody};
use poem_openapi::error::ParseRequestPayloadError;
use poem_openapi::{
    impl_apirequest_for_payload,
    payload::{ParsePayload, Payload},
    registry::{MetaSchemaRef, Registry},
    types::Type,
};
use serde::de::DeserializeOwned;

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

    async fn from_request(request: &Request, body: &mut RequestBody) -> poem::Result<Self> {
        let bytes = Vec::<u8>::from_request(request, body).await?;
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|err| {
            ParseRequestPayloadError {
                reason: err.to_string(),
            }
            .into()
        })
    }
}

impl_apirequest_for_payload!(JsonBody<T>, T: Type + DeserializeOwned);
