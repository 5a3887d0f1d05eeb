//! Which browser origins may call the gateway (HTTP with CORS, and WebSocket handshakes):
//! the gateway's own, those listed in `allowed_origins`, or any when `"*"` is written.

use crate::error::{Error, Result};

/// Where a request comes from, as far as the browser's same-origin policy goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Same,
    Cross,
}

#[derive(Debug, Clone, Default)]
pub struct OriginPolicy {
    allowed: Vec<String>,
    any: bool,
}

impl OriginPolicy {
    pub fn new(allowed_origins: &[String]) -> Self {
        Self {
            any: allowed_origins.iter().any(|origin| origin == "*"),
            allowed: allowed_origins
                .iter()
                .map(|origin| origin.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
        }
    }

    /// Requests without an `Origin` header come from non-browser clients and count as
    /// same-origin; a browser's origin must be the gateway's own (same host) or allowed.
    pub fn classify(&self, origin: Option<&str>, host: Option<&str>) -> Result<Origin> {
        let Some(origin) = origin else {
            return Ok(Origin::Same);
        };
        let origin = origin.to_ascii_lowercase();
        let same_origin = match (origin.split_once("://"), host) {
            (Some((_, origin_host)), Some(host)) => origin_host.eq_ignore_ascii_case(host),
            _ => false,
        };
        if same_origin {
            Ok(Origin::Same)
        } else if self.any || self.allowed.contains(&origin) {
            Ok(Origin::Cross)
        } else {
            Err(Error::Forbidden(format!(
                "origin `{origin}` is not allowed; add it to `allowed_origins` in the configuration"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_origin_and_non_browser_clients_are_same_origin() {
        let policy = OriginPolicy::new(&[]);
        assert_eq!(
            policy.classify(None, Some("127.0.0.1:8080")).unwrap(),
            Origin::Same
        );
        let own = policy.classify(Some("http://127.0.0.1:8080"), Some("127.0.0.1:8080"));
        assert_eq!(own.unwrap(), Origin::Same);
    }

    #[test]
    fn other_origins_need_to_be_listed() {
        let policy = OriginPolicy::new(&["https://chat.example.com/".into()]);
        let listed = policy.classify(Some("https://chat.example.com"), Some("gw:8080"));
        assert_eq!(listed.unwrap(), Origin::Cross);
        let refused = policy.classify(Some("https://evil.example"), Some("gw:8080"));
        assert_eq!(refused.unwrap_err().code(), "forbidden");
    }

    #[test]
    fn a_wildcard_must_be_explicit() {
        let any = OriginPolicy::new(&["*".into()]);
        assert_eq!(
            any.classify(Some("https://any.where"), None).unwrap(),
            Origin::Cross
        );
        assert!(
            OriginPolicy::new(&[])
                .classify(Some("https://any.where"), None)
                .is_err()
        );
    }
}
