//! Logging, and the request id every request carries in its span, its logs and its response.

use std::{
    borrow::Cow,
    io::{IsTerminal, Write},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use poem::{Endpoint, IntoResponse, Middleware, Request, Response};
use tracing::Instrument;
use tracing_subscriber::EnvFilter;

use crate::{error::Error, provider::Usage};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Logs go to stderr; `RUST_LOG` overrides the default level (`info`).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let terminal = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(terminal);
    match format {
        // Text logs carry client-supplied values (a model name, a message) as they are:
        // their control characters are escaped so that none can forge or hide a line.
        LogFormat::Text => builder
            .with_writer(move || EscapingWriter {
                inner: std::io::stderr(),
                keep_colours: terminal,
            })
            .init(),
        // JSON escapes control characters itself.
        LogFormat::Json => builder.with_writer(std::io::stderr).json().init(),
    }
}

/// Writes each log line with its control characters escaped (`\r`, `\n`, `\u{1b}`, …),
/// except the newline that ends it. On a terminal, where the formatter colours the line
/// with escape sequences, only line breaks are escaped.
struct EscapingWriter<W> {
    inner: W,
    keep_colours: bool,
}

impl<W: Write> Write for EscapingWriter<W> {
    /// The formatter hands over one whole event per call; it goes out in one write, so that
    /// lines of concurrent events do not interleave.
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(line);
        let (body, end) = match text.strip_suffix('\n') {
            Some(body) => (body, "\n"),
            None => (text.as_ref(), ""),
        };
        match escape_controls(body, self.keep_colours) {
            Cow::Borrowed(_) => self.inner.write_all(line)?,
            Cow::Owned(mut escaped) => {
                escaped.push_str(end);
                self.inner.write_all(escaped.as_bytes())?;
            }
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// `text` with its control characters (C0 but tab, DEL, C1, and the Unicode line and
/// paragraph separators) escaped; with `keep_colours`, only CR and LF.
fn escape_controls(text: &str, keep_colours: bool) -> Cow<'_, str> {
    let escaped = |c: char| {
        if keep_colours {
            matches!(c, '\r' | '\n')
        } else {
            (c.is_control() && c != '\t') || matches!(c, '\u{2028}' | '\u{2029}')
        }
    };
    if !text.chars().any(escaped) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if escaped(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

const HEADER: &str = "x-request-id";

/// Gives each request an id (the client's `x-request-id` if it sent a sane one), a span
/// carrying it, one log line with status and latency, the id in the response, and its
/// count and the gateway's own share of its latency in the metrics, under the route label
/// the server's route table gives its path.
pub struct RequestId {
    pub route_label: fn(&str) -> &'static str,
}

impl<E: Endpoint> Middleware<E> for RequestId {
    type Output = RequestIdEndpoint<E>;

    fn transform(&self, endpoint: E) -> Self::Output {
        RequestIdEndpoint {
            inner: endpoint,
            route_label: self.route_label,
        }
    }
}

pub struct RequestIdEndpoint<E> {
    inner: E,
    route_label: fn(&str) -> &'static str,
}

impl<E: Endpoint> Endpoint for RequestIdEndpoint<E> {
    type Output = Response;

    async fn call(&self, mut request: Request) -> poem::Result<Response> {
        let note = Arc::new(RequestNote::default());
        request.extensions_mut().insert(note.clone());
        let route = (self.route_label)(request.uri().path());
        let id = request
            .headers()
            .get(HEADER)
            .and_then(|value| value.to_str().ok())
            .filter(|value| {
                !value.is_empty()
                    && value.len() <= 128
                    && value.bytes().all(|byte| byte.is_ascii_graphic())
            })
            .map(str::to_owned)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        // Only the path is logged: query strings carry prompts.
        let span = tracing::info_span!(
            "request",
            request_id = %id,
            method = %request.method(),
            path = %request.uri().path(),
            key = tracing::field::Empty,
        );
        async move {
            let started = Instant::now();
            let mut response = match self.inner.call(request).await {
                Ok(output) => output.into_response(),
                Err(err) => err.into_response(),
            };
            let elapsed = started.elapsed();
            let status = response.status().as_u16();
            let fields = std::mem::take(&mut *note.0.lock().expect("the note is never poisoned"));
            let asked = fields.model.as_ref().map_or("", |model| model.logged());
            tracing::info!(status, model = asked, micros = elapsed.as_micros() as u64, "answered");
            let label = match fields.model {
                Some(NotedModel { name, known: true }) => name,
                _ => String::new(),
            };
            metrics::counter!(REQUESTS, "route" => route, "model" => label, "status" => status.to_string())
                .increment(1);
            if let Some(upstream) = fields.upstream {
                metrics::histogram!(GATEWAY_OVERHEAD_SECONDS, "route" => route)
                    .record(elapsed.saturating_sub(upstream).as_secs_f64());
            }
            if let Ok(value) = id.parse() {
                response.headers_mut().insert(HEADER, value);
            }
            Ok(response)
        }
        .instrument(span)
        .await
    }
}

/// Metric names, all under `modelgate_`.
pub const REQUESTS: &str = "modelgate_requests_total";
pub const GATEWAY_OVERHEAD_SECONDS: &str = "modelgate_gateway_overhead_seconds";
pub const UPSTREAM_SECONDS: &str = "modelgate_upstream_seconds";
pub const FIRST_CHUNK_SECONDS: &str = "modelgate_first_chunk_seconds";
pub const TOKENS: &str = "modelgate_tokens_total";
pub const ACTIVE_STREAMS: &str = "modelgate_active_streams";
pub const CANCELLATIONS: &str = "modelgate_cancellations_total";
pub const UPSTREAM_ERRORS: &str = "modelgate_upstream_errors_total";
/// Redis commands that failed or timed out, by `operation` (see `cluster`).
pub const REDIS_ERRORS: &str = "modelgate_redis_errors_total";
/// Bytes of resumable streams' events this process holds (see `resume`).
pub const RESUME_BYTES_HELD: &str = "modelgate_resume_bytes_held";
/// Resumes asked for, by `outcome`: `resumed`, `finished` (nothing left), `expired`,
/// `refused` (another key's stream, or its Redis unreachable).
pub const RESUMES: &str = "modelgate_resumes_total";

/// Installs the Prometheus recorder; `/metrics` renders the returned handle.
pub fn install_metrics() -> PrometheusHandle {
    const SECONDS: &[f64] = &[
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    ];
    PrometheusBuilder::new()
        .set_buckets(SECONDS)
        .expect("the bucket list is not empty")
        .install_recorder()
        .expect("the metrics recorder is installed once, at start-up")
}

pub fn count_tokens(model: &str, key: &str, usage: Usage) {
    for (direction, count) in [
        ("input", usage.input_tokens),
        ("output", usage.output_tokens),
    ] {
        metrics::counter!(TOKENS, "model" => model.to_owned(), "key" => key.to_owned(), "direction" => direction)
            .increment(u64::from(count));
    }
}

/// Counts a request that ended in `err`: a cancellation when the client left or the
/// gateway stopped, an upstream error otherwise.
pub fn count_failure(model: &str, err: &Error) {
    match err {
        Error::ClientClosed => count_cancellation(CancelReason::ClientGone),
        Error::ShuttingDown => count_cancellation(CancelReason::Shutdown),
        err => {
            metrics::counter!(UPSTREAM_ERRORS, "model" => model.to_owned(), "code" => err.code())
                .increment(1);
        }
    }
}

/// Why a generation ended before its answer was complete: the `reason` label of
/// [`CANCELLATIONS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// The client closed its connection.
    ClientGone,
    /// The client asked for it (`{"type":"cancel"}`).
    ClientCancel,
    /// The client did not read the answer within `slow_client_timeout`.
    SlowClient,
    /// The gateway stopped at the end of its grace period.
    Shutdown,
}

impl CancelReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CancelReason::ClientGone => "client_gone",
            CancelReason::ClientCancel => "client_cancel",
            CancelReason::SlowClient => "slow_client",
            CancelReason::Shutdown => "shutdown",
        }
    }
}

pub fn count_cancellation(reason: CancelReason) {
    let reason = reason.as_str();
    metrics::counter!(CANCELLATIONS, "reason" => reason).increment(1);
    tracing::info!(reason, "generation cancelled; upstream call dropped");
}

/// What a handler learned about its request that the request-id middleware reports: the
/// model asked for, and the time spent waiting on the upstream (so that the gateway's own
/// share of the latency can be measured).
#[derive(Default)]
pub struct RequestNote(Mutex<NoteFields>);

#[derive(Default)]
struct NoteFields {
    model: Option<NotedModel>,
    upstream: Option<Duration>,
}

/// The model a request asked for: the log names it whatever it is, the metrics only when the
/// registry knows it, so that clients cannot grow the metrics without bound.
struct NotedModel {
    name: String,
    known: bool,
}

/// The most of an unknown model's name the access log repeats: a client can send any name.
const LOGGED_NAME_MAX_BYTES: usize = 256;

impl NotedModel {
    fn logged(&self) -> &str {
        let mut end = self.name.len().min(LOGGED_NAME_MAX_BYTES);
        while !self.name.is_char_boundary(end) {
            end -= 1;
        }
        &self.name[..end]
    }
}

impl RequestNote {
    /// The model the request asked for, and whether the registry knows it.
    pub fn model(&self, name: &str, known: bool) {
        self.0.lock().expect("the note is never poisoned").model = Some(NotedModel {
            name: name.to_owned(),
            known,
        });
    }

    pub fn upstream(&self, waited: Duration) {
        self.0.lock().expect("the note is never poisoned").upstream = Some(waited);
    }

    /// The note a request carries, if the middleware gave it one.
    pub fn of(request: &Request) -> Option<&Arc<RequestNote>> {
        request.extensions().get::<Arc<RequestNote>>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_cannot_forge_a_log_line() {
        let mut written = Vec::new();
        let mut writer = EscapingWriter {
            inner: &mut written,
            keep_colours: false,
        };
        writer
            .write_all(b"INFO model=x\r\nFORGED \x1b[2Jtab\there\n")
            .unwrap();
        assert_eq!(
            String::from_utf8(written).unwrap(),
            "INFO model=x\\r\\nFORGED \\u{1b}[2Jtab\there\n"
        );
    }

    #[test]
    fn on_a_terminal_colours_stay_and_line_breaks_are_escaped() {
        assert_eq!(
            escape_controls("\x1b[32mINFO\x1b[0m a\r\nb", true),
            "\x1b[32mINFO\x1b[0m a\\r\\nb"
        );
    }
}
