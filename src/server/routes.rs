//! Every route the gateway serves, declared once: the router, the `Allow` header of a 405,
//! the route label of the metrics and who may call it all come from [`ROUTES`]. A new route
//! is one entry there.

use poem::{Response, Route, endpoint::BoxEndpoint, error::ResponseError};

use crate::error::Error;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone: the page, the documents, the model list, the health check.
    Public,
    /// The API: a key when keys are configured (checked from the headers, before any body
    /// byte is read), and from browsers only same-origin or from an allowed origin.
    Api,
}

/// What answers a route.
#[derive(Clone, Copy)]
pub enum Serve {
    /// Operations of the OpenAPI service ([`super::api`]), which mounts its own paths: a test
    /// checks that they are the table's.
    OpenApi,
    /// The chat page, answered around the router: poem lets the OpenAPI service, nested at
    /// `/`, win over a route at exactly `/` ([`super::ui::page_at_root`]).
    Page,
    /// This endpoint, at the route's path (nested under it for a path ending in `*`).
    Endpoint(fn() -> BoxEndpoint<'static>),
}

/// How a route's errors look to its clients, whatever refused the request (the key check,
/// the origin check, the body limits, the handler).
pub type ErrorShape = fn(&Error) -> Response;

pub struct RouteSpec {
    /// An exact path, or with a trailing `*`, every path that starts with what precedes it;
    /// a segment `{name}` stands for any one non-empty segment (a path parameter).
    pub path: &'static str,
    /// The methods it answers, as a 405's `Allow` header lists them.
    pub allow: &'static str,
    pub access: Access,
    pub serve: Serve,
    pub errors: ErrorShape,
}

const fn route(path: &'static str, allow: &'static str, access: Access, serve: Serve) -> RouteSpec {
    RouteSpec {
        path,
        allow,
        access,
        serve,
        errors: native_error,
    }
}

impl RouteSpec {
    /// A route of an API that imitates another service, whose clients expect its error shape.
    const fn errors(self, errors: ErrorShape) -> RouteSpec {
        RouteSpec { errors, ..self }
    }
}

/// The gateway's own shape, `{"error": {"code", "message"}}`.
fn native_error(err: &Error) -> Response {
    err.as_response()
}

/// How errors on `path` look.
pub fn error_shape(path: &str) -> ErrorShape {
    route_of(path).map_or(native_error, |route| route.errors)
}

use Access::{Api, Public};
use Serve::{Endpoint, OpenApi, Page};

pub const ROUTES: &[RouteSpec] = &[
    route("/", "GET, HEAD", Public, Page),
    route("/ui/*", "GET", Public, Endpoint(super::ui::assets)),
    route("/docs*", "GET", Public, Endpoint(super::docs)),
    route(
        "/openapi.json",
        "GET",
        Public,
        Endpoint(super::openapi_document),
    ),
    route("/healthz", "GET", Public, OpenApi),
    route("/models", "GET", Public, OpenApi),
    route("/invoke", "POST", Api, OpenApi),
    route("/stream", "GET, POST", Api, OpenApi),
    route("/ws/model", "GET", Api, Endpoint(super::ws::endpoint)),
    route("/metrics", "GET", Api, Endpoint(super::metrics)),
    route("/v1/messages", "POST", Api, OpenApi).errors(super::anthropic::error_response),
    route("/v1/messages/count_tokens", "POST", Api, OpenApi)
        .errors(super::anthropic::error_response),
    route("/v1/chat/completions", "POST", Api, OpenApi).errors(super::openai::error_response),
    route("/v1/models", "GET", Api, OpenApi).errors(super::openai::error_response),
    route("/v1/models/{model}", "GET", Api, OpenApi).errors(super::openai::error_response),
];

/// The router of every [`Serve::Endpoint`] route, with the OpenAPI service at `/`.
pub fn router() -> Route {
    ROUTES
        .iter()
        .fold(Route::new(), |router, route| match route.serve {
            Serve::Endpoint(endpoint) => match route.path.strip_suffix('*') {
                Some(prefix) => router.nest(prefix.trim_end_matches('/'), endpoint()),
                None => router.at(route.path, endpoint()),
            },
            Serve::OpenApi | Serve::Page => router,
        })
        .nest("/", super::api_service())
}

/// The route a path belongs to, if any.
pub fn route_of(path: &str) -> Option<&'static RouteSpec> {
    ROUTES
        .iter()
        .find(|route| match route.path.strip_suffix('*') {
            Some(prefix) => path.starts_with(prefix),
            None => matches_template(route.path, path),
        })
}

/// Whether `path` is `template`, whose `{name}` segments match any one non-empty segment.
fn matches_template(template: &str, path: &str) -> bool {
    if !template.contains('{') {
        return template == path;
    }
    let mut segments = path.split('/');
    template.split('/').all(|expected| {
        segments.next().is_some_and(|segment| {
            segment == expected
                || (expected.starts_with('{') && expected.ends_with('}') && !segment.is_empty())
        })
    }) && segments.next().is_none()
}

/// The metrics label of a path: its route's path without the `*` (`/ui/*` is `/ui`), or
/// `other`, so that random paths cannot grow the metrics without bound.
pub fn label(path: &str) -> &'static str {
    route_of(path).map_or("other", |route| {
        match route.path.trim_end_matches('*').trim_end_matches('/') {
            "" => "/",
            prefix => prefix,
        }
    })
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
            assert!(matches!(route.serve, Serve::OpenApi), "{path}");
            let mut methods: Vec<String> = operations
                .as_object()
                .unwrap()
                .keys()
                .map(|method| method.to_ascii_uppercase())
                .collect();
            methods.sort();
            assert_eq!(methods.join(", "), route.allow, "{path}");
        }
        for route in ROUTES {
            if matches!(route.serve, Serve::OpenApi) {
                assert!(
                    paths.contains_key(route.path),
                    "{} is not in the API",
                    route.path
                );
            }
        }
    }

    #[test]
    fn unknown_paths_have_no_route_and_a_bounded_label() {
        assert!(route_of("/invoke/x").is_none());
        assert_eq!(label("/random/path"), "other");
        assert_eq!(label("/docs/index.css"), "/docs");
        assert_eq!(label("/ui/app.js"), "/ui");
        assert_eq!(label("/"), "/");
        assert_eq!(route_of("/ws/model").unwrap().access, Access::Api);
    }

    #[test]
    fn a_path_parameter_matches_one_non_empty_segment_and_labels_by_its_template() {
        assert_eq!(label("/v1/models/llama3"), "/v1/models/{model}");
        assert_eq!(label("/v1/models"), "/v1/models");
        assert_eq!(label("/v1/models/"), "other");
        assert_eq!(label("/v1/models/a/b"), "other");
        assert_eq!(label("/v1/chat/completions"), "/v1/chat/completions");
    }
}
