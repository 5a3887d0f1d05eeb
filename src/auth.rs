//! API keys and their limits. Keys are kept and compared as SHA-256 hashes, in constant
//! time; a key's secret never reaches a log, a metric or an error message (its `id` does).

use std::{num::NonZeroU32, sync::Arc, time::Duration};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter, clock::Clock};
use poem::Request;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{
    config::ApiKeySpec,
    error::{Error, Result},
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
    requests: Option<DefaultDirectRateLimiter>,
    tokens: Option<DefaultDirectRateLimiter>,
    /// The key's upstream calls in flight (config `concurrent_streams`: every call counts,
    /// `/invoke` as much as a stream).
    calls: Option<Arc<Semaphore>>,
    concurrent_calls: usize,
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
        let per_minute = |n: NonZeroU32| RateLimiter::direct(Quota::per_minute(n));
        Auth {
            keys: specs
                .iter()
                .map(|spec| {
                    Arc::new(ApiKey {
                        id: spec.id.clone(),
                        sha256: spec.sha256,
                        requests: spec.limits.requests_per_minute.map(per_minute),
                        tokens: spec.limits.tokens_per_minute.map(per_minute),
                        calls: spec
                            .limits
                            .concurrent_streams
                            .map(|n| Arc::new(Semaphore::new(n.get()))),
                        concurrent_calls: spec.limits.concurrent_streams.map_or(0, |n| n.get()),
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
                "an API key is required: send `Authorization: Bearer <key>` or `x-api-key: <key>` \
                 (browsers: the `api_key` query parameter, or the WebSocket subprotocol \
                 `bearer.<key>`)"
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
    // Anthropic's SDKs and Claude Code send the key this way.
    if let Some(key) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(key.trim().to_owned());
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

    /// Takes one request from the key's per-minute budget and checks it has tokens left.
    /// Called last, once every other check passed, so that a refused request costs nothing.
    pub fn admit(&self) -> Result<()> {
        let Some(key) = &self.0 else { return Ok(()) };
        if let Some(tokens) = &key.tokens {
            // This takes one token (so that a refusal below costs next to nothing); the
            // tokens the request uses are taken when it ends (`spend_tokens`).
            tokens.check().map_err(|not_until| {
                rate_limited(
                    format!("API key `{}` has used its tokens per minute", key.id),
                    &not_until,
                )
            })?;
        }
        if let Some(requests) = &key.requests {
            requests.check().map_err(|not_until| {
                rate_limited(
                    format!("API key `{}` is over its requests per minute", key.id),
                    &not_until,
                )
            })?;
        }
        Ok(())
    }

    /// A slot among the key's concurrent upstream calls, held for the call's whole life.
    pub fn call_permit(&self) -> Result<Option<OwnedSemaphorePermit>> {
        let Some(key) = &self.0 else { return Ok(None) };
        let Some(calls) = &key.calls else {
            return Ok(None);
        };
        calls.clone().try_acquire_owned().map(Some).map_err(|_| {
            Error::RateLimited {
                message: format!(
                    "API key `{}` already has {} upstream calls in flight (concurrent_streams); wait for one to end",
                    key.id, key.concurrent_calls
                ),
                retry_after_secs: 1,
            }
        })
    }

    /// Takes the tokens a request used from the key's per-minute budget, as far as it goes.
    pub fn spend_tokens(&self, count: u32) {
        if let Some(tokens) = self.0.as_ref().and_then(|key| key.tokens.as_ref()) {
            spend(tokens, count);
        }
    }
}

/// Takes up to `count` cells from a limiter: GCRA has no debt, so a request that used more
/// than is left empties the budget instead.
fn spend(limiter: &DefaultDirectRateLimiter, count: u32) {
    let mut left = count;
    let mut chunk = count;
    while left > 0 && chunk > 0 {
        match NonZeroU32::new(chunk.min(left)).map(|n| limiter.check_n(n)) {
            Some(Ok(Ok(()))) => left -= chunk.min(left),
            _ => chunk /= 2,
        }
    }
}

fn rate_limited(
    message: String,
    not_until: &governor::NotUntil<<governor::clock::DefaultClock as Clock>::Instant>,
) -> Error {
    let wait: Duration = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
    Error::RateLimited {
        message,
        retry_after_secs: wait.as_secs().max(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KeyLimits;

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

    #[test]
    fn requests_per_minute_are_limited_with_a_retry_after() {
        let auth = auth(KeyLimits {
            requests_per_minute: NonZeroU32::new(2),
            ..KeyLimits::default()
        });
        let caller = auth
            .authenticate(&request(Some("Bearer s3cret"), "/"))
            .unwrap();
        assert!(caller.admit().is_ok());
        assert!(caller.admit().is_ok());
        let refused = caller.admit().unwrap_err();
        assert_eq!(refused.code(), "rate_limited");
        assert!(refused.retry_after().unwrap() >= 1);
    }

    #[test]
    fn spent_tokens_exhaust_the_budget() {
        let auth = auth(KeyLimits {
            tokens_per_minute: NonZeroU32::new(100),
            ..KeyLimits::default()
        });
        let caller = auth
            .authenticate(&request(Some("Bearer s3cret"), "/"))
            .unwrap();
        assert!(caller.admit().is_ok());
        caller.spend_tokens(250);
        assert_eq!(caller.admit().unwrap_err().code(), "rate_limited");
    }

    #[test]
    fn concurrent_calls_are_limited_while_permits_live() {
        let auth = auth(KeyLimits {
            concurrent_streams: std::num::NonZeroUsize::new(1),
            ..KeyLimits::default()
        });
        let caller = auth
            .authenticate(&request(Some("Bearer s3cret"), "/"))
            .unwrap();
        let held = caller.call_permit().unwrap();
        assert!(caller.call_permit().is_err());
        drop(held);
        assert!(caller.call_permit().is_ok());
    }
}
