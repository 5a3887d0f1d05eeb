//! Which browser origins may open WebSockets: the gateway's own, those listed in
//! `allowed_origins`, or any when `"*"` is written explicitly.

use crate::error::{Error, Result};

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

    /// Requests without an `Origin` header come from non-browser clients and are allowed;
    /// a browser's origin must be the gateway's own (same host) or listed.
    pub fn check(&self, origin: Option<&str>, host: Option<&str>) -> Result<()> {
        let Some(origin) = origin else { return Ok(()) };
        let origin = origin.to_ascii_lowercase();
        let same_origin = match (origin.split_once("://"), host) {
            (Some((_, origin_host)), Some(host)) => origin_host.eq_ignore_ascii_case(host),
            _ => false,
        };
        if self.any || same_origin || self.allowed.contains(&origin) {
            Ok(())
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
    fn same_origin_and_non_browser_clients_are_allowed() {
        let policy = OriginPolicy::new(&[]);
        assert!(policy.check(None, Some("127.0.0.1:8080")).is_ok());
        assert!(
            policy
                .check(Some("http://127.0.0.1:8080"), Some("127.0.0.1:8080"))
                .is_ok()
        );
    }

    #[test]
    fn other_origins_need_to_be_listed() {
        let policy = OriginPolicy::new(&["https://chat.example.com/".into()]);
        assert!(
            policy
                .check(Some("https://chat.example.com"), Some("gw:8080"))
                .is_ok()
        );
        let refused = policy.check(Some("https://evil.example"), Some("gw:8080"));
        assert_eq!(refused.unwrap_err().code(), "forbidden");
    }

    #[test]
    fn a_wildcard_must_be_explicit() {
        assert!(
            OriginPolicy::new(&["*".into()])
                .check(Some("https://any.where"), None)
                .is_ok()
        );
        assert!(
            OriginPolicy::new(&[])
                .check(Some("https://any.where"), None)
                .is_err()
        );
    }
}
