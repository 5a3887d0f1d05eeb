//! The chat page at `/` and its files under `/ui/`: plain HTML, CSS and JavaScript modules
//! compiled into the binary, so the page works offline with nothing to build or download.

use poem::{
    Endpoint, EndpointExt, IntoResponse, Request, Response, Route,
    endpoint::BoxEndpoint,
    get, handler,
    http::{Method, StatusCode, header},
    web::Path,
};

use crate::error::Error;

/// Name under `/ui/`, content type, contents.
const FILES: &[(&str, &str, &str)] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("ui/app.js"),
    ),
    (
        "transport.js",
        "text/javascript; charset=utf-8",
        include_str!("ui/transport.js"),
    ),
    (
        "markdown.js",
        "text/javascript; charset=utf-8",
        include_str!("ui/markdown.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("ui/style.css"),
    ),
    ("icon.svg", "image/svg+xml", include_str!("ui/icon.svg")),
];

/// The page renders model output as text; this policy is the second line of defence should
/// markup ever get through: no inline scripts or styles, and nothing from other origins.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; object-src 'none'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// Serves the page at `/`. It wraps the routes instead of being one because the API is
/// nested at `/`, and poem lets a nest's catch-all win over a route at exactly `/`.
pub async fn page_at_root<E: Endpoint>(next: E, request: Request) -> poem::Result<Response> {
    if request.uri().path() == "/" && [Method::GET, Method::HEAD].contains(request.method()) {
        return Ok(file(
            "text/html; charset=utf-8",
            include_str!("ui/index.html"),
        ));
    }
    next.call(request).await.map(IntoResponse::into_response)
}

/// The files under `/ui/`, nested there by the route table.
pub fn assets() -> BoxEndpoint<'static> {
    Route::new().at("/:file", get(asset)).boxed()
}

#[handler]
fn asset(Path(name): Path<String>) -> poem::Result<Response> {
    let (_, content_type, contents) = FILES
        .iter()
        .find(|(file_name, _, _)| *file_name == name)
        .ok_or_else(|| Error::NotFound(format!("no file `/ui/{name}`")))?;
    Ok(file(content_type, contents))
}

fn file(content_type: &str, contents: &'static str) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .content_type(content_type)
        // A new binary may bring a new page: browsers revalidate instead of guessing.
        .header(header::CACHE_CONTROL, "no-cache")
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY)
        .body(contents)
}
