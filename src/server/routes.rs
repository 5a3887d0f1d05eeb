//! Every route the gateway serves, declared once: the `Allow` header of a 405, the route
//! label of the metrics and who may call it all come from this table; `app()` mounts the
//! endpoints and a test checks that the OpenAPI operations are the table's.

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone: the page, the documents, the model list, the health check.
    Public,
    /// The API: a key when keys are configured (checked from the headers, before any body
    /// byte is read), and from browsers only same-origin or from an allowed origin.
    Api,
}

pub struct RouteSpec {
    /// An exact path, or with a trailing `*`, every path that starts with what precedes it.
    pub path: &'static str,
    /// The methods it answers, as a 405's `Allow` header lists them.
    pub allow: &'static str,
    /// Its `route` label in the metrics.
    pub label: &'static str,
    pub access: Access,
}

const fn route(
    path: &'static str,
    allow: &'static str,
    label: &'static str,
    access: Access,
) -> RouteSpec {
    RouteSpec {
        path,
        allow,
        label,
        access,
    }
}

pub const ROUTES: &[RouteSpec] = &[
    route("/", "GET, HEAD", "/", Access::Public),
    route("/ui/*", "GET", "/ui", Access::Public),
    route("/docs*", "GET", "/docs", Access::Public),
    route("/openapi.json", "GET", "/openapi.json", Access::Public),
    route("/healthz", "GET", "/healthz", Access::Public),
    route("/models", "GET", "/models", Access::Public),
    route("/invoke", "POST", "/invoke", Access::Api),
    route("/stream", "GET, POST", "/stream", Access::Api),
    route("/ws/model", "GET", "/ws/model", Access::Api),
    route("/metrics", "GET", "/metrics", Access::Api),
];

/// The route a path belongs to, if any.
pub fn route_of(path: &str) -> Option<&'static RouteSpec> {
    ROUTES
        .iter()
        .find(|route| match route.path.strip_suffix('*') {
            Some(prefix) => path.starts_with(prefix),
            None => route.path == path,
        })
}

/// The metrics label of a path: its route's, or `other`, so that random paths cannot grow
/// the metrics without bound.
pub fn label(path: &str) -> &'static str {
    route_of(path).map_or("other", |route| route.label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_openapi_operation_is_in_the_table_with_its_methods() {
        let spec: serde_json::Value = serde_json::from_str(&super::super::openapi_json()).unwrap();
        let paths = spec["paths"].as_object().unwrap();
        for (path, operations) in paths {
            let route = route_of(path).unwrap_or_else(|| panic!("{path} is not in ROUTES"));
            assert_eq!(route.path, path.as_str());
            let mut methods: Vec<String> = operations
                .as_object()
                .unwrap()
                .keys()
                .map(|method| method.to_ascii_uppercase())
                .collect();
            methods.sort();
            assert_eq!(methods.join(", "), route.allow, "{path}");
        }
    }

    #[test]
    fn unknown_paths_have_no_route_and_a_bounded_label() {
        assert!(route_of("/invoke/x").is_none());
        assert_eq!(label("/random/path"), "other");
        assert_eq!(label("/docs/index.css"), "/docs");
        assert_eq!(route_of("/ws/model").unwrap().access, Access::Api);
    }
}
