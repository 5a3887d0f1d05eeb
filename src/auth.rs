//! API keys and their limits. Keys are kept and compared as SHA-256 hashes, in constant
//! time; a key's secret never reaches a log, a metric or an error message (its `id` does).

use std::sync::Arc;

use poem::Request;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{
    config::{ApiKeySpec, KeyLimits},
    error::{Error, Result},
    limiter::KeyRef,
};

/// The WebSocket subprotocol prefix that carries a key, for browsers, which cannot set
/// headers on a WebSocket: `new WebSocket(url, ["modelgate.v1", "bearer." + key])`.
pub const WS_PROTOCOL_PREFIX: &str = "bearer.";

/// The configured keys; none means the gateway is open.
pub struct Auth {
    keys: Vec<Arc<ApiKey>>,
}

pub struct ApiKey {
    pub id: String,
    sha256: [u8; 32],
    /// Kept by the gateway's [`crate::limiter::Limiter`].
    pub limits: KeyLimits,
}

/// Who is calling: their key when keys are configured, `None` on an open gateway.
#[derive(Clone, Default)]
pub struct Caller(Option<Arc<ApiKey>>);

#[derive(Deserialize)]
struct KeyQuery {
    api_key: Option<String>,
}

impl Auth {
    pub fn new(specs: &[ApiKeySpec]) -> Self {
        Auth {
            keys: specs
                .iter()
                .map(|spec| {
                    Arc::new(ApiKey {
                        id: spec.id.clone(),
                        sha256: spec.sha256,
                        limits: spec.limits,
                    })
                })
                .collect(),
        }
    }

    pub fn is_open(&self) -> bool {
        self.keys.is_empty()
    }

    /// The caller of a request that presents its key as `Authorization: Bearer <key>`, as
    /// an `api_key` query parameter, or as a WebSocket subprotocol `bearer.<key>`.
    pub fn authenticate(&self, request: &Request) -> Result<Caller> {
        if self.is_open() {
            return Ok(Caller(None));
        }
        let presented = presented_key(request).ok_or_else(|| {
            Error::Unauthorized(
                "an API key is required: send `Authorization: Bearer <key>` (browsers: the \
                 `api_key` query parameter, or the WebSocket subprotocol `bearer.<key>`)"
                    .into(),
            )
        })?;
        let hash: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        // Every key is compared, in constant time, so timing tells nothing about which
        // key came close.
        let mut found = None;
        for key in &self.keys {
            if bool::from(key.sha256.ct_eq(&hash)) {
                found = Some(key.clone());
            }
        }
        let key = found.ok_or_else(|| Error::Unauthorized("the API key is not valid".into()))?;
        tracing::Span::current().record("key", key.id.as_str());
        Ok(Caller(Some(key)))
    }
}

fn presented_key(request: &Request) -> Option<String> {
    let headers = request.headers();
    if let Some(value) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        let (scheme, key) = value.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| key.trim().to_owned());
    }
    if let Ok(KeyQuery { api_key: Some(key) }) = request.params::<KeyQuery>() {
        return Some(key);
    }
    headers
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .find_map(|protocol| protocol.trim().strip_prefix(WS_PROTOCOL_PREFIX))
        .map(str::to_owned)
}

impl Caller {
    /// The key's id, for logs and metrics.
    pub fn id(&self) -> &str {
        self.0.as_ref().map_or("none", |key| key.id.as_str())
    }

    /// The key and its limits, for the limiter; `None` on an open gateway.
    pub fn key(&self) -> Option<KeyRef<'_>> {
        self.0.as_ref().map(|key| KeyRef {
            id: &key.id,
            limits: &key.limits,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(limits: KeyLimits) -> Auth {
        Auth::new(&[ApiKeySpec {
            id: "team".into(),
            sha256: Sha256::digest(b"s3cret").into(),
            limits,
        }])
    }

    fn request(header: Option<&str>, uri: &str) -> Request {
        let mut builder = Request::builder().uri(uri.parse().unwrap());
        if let Some(value) = header {
            builder = builder.header("authorization", value);
        }
        builder.finish()
    }

    #[test]
    fn keys_are_found_in_the_header_the_query_or_the_websocket_protocol() {
        let auth = auth(KeyLimits::default());
        assert_eq!(
            auth.authenticate(&request(Some("Bearer s3cret"), "/"))
                .unwrap()
                .id(),
            "team"
        );
        assert_eq!(
            auth.authenticate(&request(None, "/stream?api_key=s3cret"))
                .unwrap()
                .id(),
            "team"
        );
        let ws = Request::builder()
            .header("sec-websocket-protocol", "modelgate.v1, bearer.s3cret")
            .finish();
        assert_eq!(auth.authenticate(&ws).unwrap().id(), "team");
    }

    #[test]
    fn a_missing_or_wrong_key_is_unauthorized_and_the_message_never_echoes_it() {
        let auth = auth(KeyLimits::default());
        let missing = auth.authenticate(&request(None, "/")).err().unwrap();
        assert_eq!(missing.code(), "unauthorized");
        let wrong = auth
            .authenticate(&request(Some("Bearer guess-me"), "/"))
            .err()
            .unwrap();
        assert_eq!(wrong.code(), "unauthorized");
        assert!(!wrong.to_string().contains("guess-me"));
    }

    #[test]
    fn an_open_gateway_needs_no_key() {
        let open = Auth::new(&[]);
        assert!(open.is_open());
        assert_eq!(open.authenticate(&request(None, "/")).unwrap().id(), "none");
    }
}
