//! Which browser requests the gateway serves (HTTP with CORS, and WebSocket handshakes).
//!
//! The gateway's own origins are its listen address as bound (`http://127.0.0.1:PORT`, and
//! `http://localhost:PORT` on loopback) and the configured `public_origins` — never a name
//! a request's `Host` says, which a DNS-rebinding page controls (an IP address in `Host`
//! cannot be rebound: a page served at that address is the gateway's, through a proxy or
//! not). A browser request (one with an `Origin` or a `Sec-Fetch-Site` header) must name
//! one of the gateway's own hosts or an IP address, and
//! a cross-site one may call the API only from an origin listed in `allowed_origins` (or
//! any when `"*"` is written). Clients that are not browsers send neither header and are
//! not concerned.

use std::net::SocketAddr;

use crate::error::{Error, Result};

/// Where a request comes from, as far as the browser's same-origin policy goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Same,
    Cross,
}

/// What a request says about where it comes from.
#[derive(Debug, Clone, Copy, Default)]
pub struct BrowserMarks<'a> {
    /// The `Origin` header.
    pub origin: Option<&'a str>,
    /// The `Sec-Fetch-Site` header.
    pub fetch_site: Option<&'a str>,
    /// The `:authority` of an HTTP/2 request, else the `Host` header.
    pub host: Option<&'a str>,
}

#[derive(Debug, Clone, Default)]
pub struct OriginPolicy {
    /// The gateway's own origins, lowercase, without a trailing `/`.
    own: Vec<String>,
    /// Their `host[:port]` parts, as browsers write them in `Host`.
    own_hosts: Vec<String>,
    allowed: Vec<String>,
    any: bool,
}

impl OriginPolicy {
    /// `bound` is the address the listener actually bound (its port, when 0 was asked for).
    pub fn new(allowed_origins: &[String], public_origins: &[String], bound: SocketAddr) -> Self {
        let normalize = |origin: &String| origin.trim_end_matches('/').to_ascii_lowercase();
        let port = bound.port();
        let mut own: Vec<String> = public_origins.iter().map(normalize).collect();
        if bound.ip().is_unspecified() || bound.ip().is_loopback() {
            // Every address, or loopback: browsers on this machine use one of these names.
            own.extend([
                format!("http://127.0.0.1:{port}"),
                format!("http://localhost:{port}"),
                format!("http://[::1]:{port}"),
            ]);
        }
        if !bound.ip().is_unspecified() {
            own.push(format!("http://{bound}"));
        }
        let own_hosts = own.iter().map(|origin| host_of(origin)).collect();
        Self {
            own,
            own_hosts,
            any: allowed_origins.iter().any(|origin| origin == "*"),
            allowed: allowed_origins.iter().map(normalize).collect(),
        }
    }

    /// Requests without browser marks come from non-browser clients and count as
    /// same-origin. A browser request must be addressed to one of the gateway's own hosts;
    /// its origin must be the gateway's own or allowed; and a cross-site request without an
    /// origin (a link, an `<img>`, a form) may not call the API (`api`).
    pub fn classify(&self, marks: BrowserMarks<'_>, api: bool) -> Result<Origin> {
        if marks.origin.is_none() && marks.fetch_site.is_none() {
            return Ok(Origin::Same);
        }
        let host = marks.host.unwrap_or_default().to_ascii_lowercase();
        // A browser names an IP address only when its page's URL does: DNS rebinding needs a
        // name, so a page served at that address (through a proxy, say) is the gateway's.
        let by_address = is_ip_address(&host);
        if !by_address && !self.own_hosts.contains(&host) {
            return Err(Error::Forbidden(
                "a browser request for a host this gateway does not serve; browsers reach it \
                 at its listen address or at an origin listed in `public_origins`"
                    .into(),
            ));
        }
        let Some(origin) = marks.origin else {
            return match marks.fetch_site {
                Some(site) if api && !matches!(site, "same-origin" | "none") => {
                    Err(Error::Forbidden(
                        "a cross-site request without an `Origin` may not call the API".into(),
                    ))
                }
                _ => Ok(Origin::Same),
            };
        };
        let origin = origin.trim_end_matches('/').to_ascii_lowercase();
        if (by_address && host_of(&origin) == host) || self.own.contains(&origin) {
            Ok(Origin::Same)
        } else if self.any || self.allowed.contains(&origin) {
            Ok(Origin::Cross)
        } else {
            Err(Error::Forbidden(format!(
                "origin `{}` is not allowed; add it to `allowed_origins` in the configuration",
                origin.escape_debug()
            )))
        }
    }
}

/// Whether a `Host` value (`host[:port]`) names an IP address rather than a name.
fn is_ip_address(host: &str) -> bool {
    let address = match host.strip_prefix('[') {
        Some(bracketed) => bracketed
            .split_once(']')
            .map_or(bracketed, |(address, _)| address),
        None => host.rsplit_once(':').map_or(host, |(address, _)| address),
    };
    address.parse::<std::net::IpAddr>().is_ok()
}

/// The `host[:port]` of an origin, the default port left out as browsers do in `Host`.
fn host_of(origin: &str) -> String {
    let (scheme, authority) = origin.split_once("://").unwrap_or(("", origin));
    let default_port = match scheme {
        "https" => ":443",
        _ => ":80",
    };
    authority
        .strip_suffix(default_port)
        .unwrap_or(authority)
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUND: &str = "127.0.0.1:8080";

    fn policy(allowed: &[&str], public: &[&str]) -> OriginPolicy {
        let owned = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        OriginPolicy::new(&owned(allowed), &owned(public), BOUND.parse().unwrap())
    }

    fn marks<'a>(
        origin: Option<&'a str>,
        fetch_site: Option<&'a str>,
        host: &'a str,
    ) -> BrowserMarks<'a> {
        BrowserMarks {
            origin,
            fetch_site,
            host: Some(host),
        }
    }

    #[test]
    fn non_browser_clients_and_the_gateways_own_pages_are_same_origin() {
        let policy = policy(&[], &[]);
        let none = marks(None, None, "anything:1");
        assert_eq!(policy.classify(none, true).unwrap(), Origin::Same);
        for (origin, host) in [
            ("http://127.0.0.1:8080", "127.0.0.1:8080"),
            ("http://localhost:8080", "localhost:8080"),
        ] {
            let own = marks(Some(origin), Some("same-origin"), host);
            assert_eq!(policy.classify(own, true).unwrap(), Origin::Same);
        }
    }

    #[test]
    fn a_rebound_host_is_refused_whatever_the_origin_says() {
        let policy = policy(&["*"], &[]);
        let rebound = marks(Some("http://evil.example:8080"), None, "evil.example:8080");
        assert_eq!(
            policy.classify(rebound, true).unwrap_err().code(),
            "forbidden"
        );
    }

    #[test]
    fn a_page_reached_by_ip_address_is_same_origin_whatever_the_port() {
        let policy = policy(&[], &[]);
        for (origin, host) in [
            ("http://127.0.0.1:9999", "127.0.0.1:9999"),
            ("http://192.168.1.5:8080", "192.168.1.5:8080"),
            ("http://[::1]:9999", "[::1]:9999"),
        ] {
            let proxied = marks(Some(origin), Some("same-origin"), host);
            assert_eq!(
                policy.classify(proxied, true).unwrap(),
                Origin::Same,
                "{origin}"
            );
        }
        let other = marks(Some("http://127.0.0.1:1"), None, "127.0.0.1:9999");
        assert!(policy.classify(other, true).is_err());
    }

    #[test]
    fn public_origins_are_own_origins_and_hosts() {
        let policy = policy(&[], &["https://gw.example.com"]);
        let proxied = marks(Some("https://gw.example.com"), None, "gw.example.com");
        assert_eq!(policy.classify(proxied, true).unwrap(), Origin::Same);
    }

    #[test]
    fn other_origins_need_to_be_listed() {
        let policy = policy(&["https://chat.example.com/"], &[]);
        let listed = marks(Some("https://chat.example.com"), None, BOUND);
        assert_eq!(policy.classify(listed, true).unwrap(), Origin::Cross);
        let refused = marks(Some("https://evil.example"), None, BOUND);
        assert_eq!(
            policy.classify(refused, true).unwrap_err().code(),
            "forbidden"
        );
    }

    #[test]
    fn cross_site_requests_without_an_origin_may_not_call_the_api() {
        let policy = policy(&["*"], &[]);
        for site in ["cross-site", "same-site"] {
            let link = marks(None, Some(site), BOUND);
            assert_eq!(policy.classify(link, true).unwrap_err().code(), "forbidden");
            assert_eq!(policy.classify(link, false).unwrap(), Origin::Same);
        }
        let typed = marks(None, Some("none"), BOUND);
        assert_eq!(policy.classify(typed, true).unwrap(), Origin::Same);
    }

    #[test]
    fn a_wildcard_must_be_explicit() {
        let any = marks(Some("https://any.where"), None, BOUND);
        assert_eq!(
            policy(&["*"], &[]).classify(any, true).unwrap(),
            Origin::Cross
        );
        assert!(policy(&[], &[]).classify(any, true).is_err());
    }
}
