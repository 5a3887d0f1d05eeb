//! In-process emulator of the AWS Bedrock Runtime `InvokeModel`,
//! `InvokeModelWithResponseStream` and `ConverseStream` operations (and of STS
//! `AssumeRole`), good enough to drive the real `aws-sdk-bedrockruntime` client
//! through every path the service can take: JSON replies, paced event streams,
//! Converse's typed events (text, reasoning, tool calls in fragments), HTTP
//! errors, validation errors, modeled exception frames, unmodeled error frames
//! and dropped connections.
//!
//! The wire facts it reproduces are those of the AWS SDK for Rust and the Bedrock API reference.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use aws_smithy_eventstream::frame::write_message_to;
use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
use base64::Engine as _;
use poem::http::StatusCode;
use poem::http::uri::Scheme;
use poem::listener::{Acceptor, TcpAcceptor};
use poem::web::{LocalAddr, RemoteAddr};
use poem::{Body, Request, Response, Server};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

// ---------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------

/// A running emulator. The server task is aborted when this is dropped
/// (connections already accepted keep being served until they finish).
pub struct Emulator {
    state: Shared,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

/// One request as the emulator received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// URL-decoded model id (e.g. `meta.llama3-70b-instruct-v1:0`, or an ARN).
    pub model_id: String,
    pub operation: Operation,
    /// The JSON body the client sent. `Value::Null` for an empty body; a
    /// `Value::String` holding the raw text when the body is not JSON.
    pub body: Value,
    /// Raw `Authorization` header.
    pub authorization: Option<String>,
    pub content_type: Option<String>,
}

impl Recorded {
    /// The access key id of the SigV4 credential scope (`Credential=<AKID>/…`).
    pub fn access_key(&self) -> Option<&str> {
        self.authorization
            .as_deref()?
            .split_once("Credential=")?
            .1
            .split('/')
            .next()
    }
}

/// One STS `AssumeRole` call as the emulator received it.
#[derive(Clone, Debug)]
pub struct AssumedRole {
    pub role_arn: String,
    pub external_id: Option<String>,
    pub session_name: Option<String>,
    /// Raw `Authorization` header: signed with the caller's own credentials.
    pub authorization: Option<String>,
}

/// The access key of the temporary credentials every `AssumeRole` call gets.
pub const ASSUMED_ACCESS_KEY: &str = "ASIAEMULATORASSUMED1";
/// `AssumeRole` of a role ARN ending with this is refused with `AccessDenied`.
pub const DENIED_ROLE_SUFFIX: &str = ":role/denied";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Invoke,
    InvokeStream,
    ConverseStream,
}

/// How a response stream ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamEnd {
    /// The emulator handed its final frame (or, for `DropAfter`, the
    /// connection-dropping error) to the HTTP server.
    Completed,
    /// The body stream was dropped (client gone) before that; `after_chunks`
    /// counts the `chunk` event frames handed to the HTTP server so far.
    ClientClosed { after_chunks: usize },
}

#[derive(Clone, Debug)]
pub enum Scenario {
    /// Answer with these text pieces. Invoke: one JSON body with the pieces
    /// joined. Stream: one chunk event per piece, `pace` apart (first one
    /// immediately).
    Reply {
        pieces: Vec<String>,
        pace: Duration,
        stop: NativeStop,
        input_tokens: u32,
    },
    /// Reject before any stream: HTTP `status`, header
    /// `x-amzn-ErrorType: <error_type>:http://internal.amazon.com/coral/com.amazon.bedrock/`,
    /// body `{"message": message}`. Applies to both operations.
    HttpError {
        status: u16,
        error_type: String,
        message: String,
    },
    /// Stream: the pieces as chunks (20 ms apart), then a `:message-type
    /// exception` frame, then the body ends cleanly. Invoke: answers like
    /// `Reply` with the pieces.
    ExceptionAfter {
        pieces: Vec<String>,
        exception_type: String,
        message: String,
    },
    /// Stream: the pieces, then an unmodeled `:message-type error` frame with
    /// `:error-code` / `:error-message` headers. Invoke: answers like `Reply`.
    ErrorFrameAfter {
        pieces: Vec<String>,
        code: String,
        message: String,
    },
    /// Stream: the pieces, then the connection is aborted (the body ends with
    /// an I/O error, so the chunked response is never terminated). Invoke: a
    /// 200 whose JSON body is cut in the middle the same way.
    DropAfter { pieces: Vec<String> },
    /// Stream: the pieces (20 ms apart), then no more text, never ending. Invoke: 200
    /// headers, then a body that never completes. Either is tracked like a stream, so a
    /// client that gives up shows as `ClientClosed`. So that the emulator notices a client
    /// leaving (its server, like any hyper server, only notices on a write), it writes a
    /// heartbeat every 100 ms: an event of a type the SDK does not know (which it skips),
    /// or a space in the JSON body.
    Stall { pieces: Vec<String> },
    /// ConverseStream: the blocks in order, each as its typed events (`contentBlockStart`
    /// for tool calls, one `contentBlockDelta` per piece, `pace` apart, `contentBlockStop`),
    /// then `messageStop` and `metadata`, or an exception instead of those. Built with
    /// [`Scenario::converse`] and the methods after it. Native operations refuse it.
    Converse(ConverseAnswer),
}

/// A Converse answer, as [`Scenario::Converse`] streams it.
#[derive(Clone, Debug)]
pub struct ConverseAnswer {
    pub blocks: Vec<AnswerBlock>,
    pub pace: Duration,
    /// Converse's word: `end_turn`, `tool_use`, `max_tokens`, `guardrail_intervened`…
    pub stop_reason: String,
    pub input_tokens: u32,
    pub cache_read_input_tokens: Option<u32>,
    pub cache_write_input_tokens: Option<u32>,
    /// A guardrail trace in `metadata` (an intervention).
    pub guardrail_trace: bool,
    /// An exception frame of this type after the blocks, instead of the end.
    pub exception: Option<String>,
}

impl ConverseAnswer {
    fn new() -> ConverseAnswer {
        ConverseAnswer {
            blocks: Vec::new(),
            pace: DEFAULT_PACE,
            stop_reason: "end_turn".into(),
            input_tokens: DEFAULT_INPUT_TOKENS,
            cache_read_input_tokens: None,
            cache_write_input_tokens: None,
            guardrail_trace: false,
            exception: None,
        }
    }
}

#[derive(Clone, Debug)]
pub enum AnswerBlock {
    Text(Vec<String>),
    Reasoning {
        pieces: Vec<String>,
        signature: Option<String>,
    },
    /// Encrypted reasoning (`redactedContent`).
    RedactedReasoning,
    /// A tool call whose input's JSON text comes in these fragments.
    ToolUse {
        id: String,
        name: String,
        fragments: Vec<String>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NativeStop {
    EndTurn,
    MaxTokens,
    StopSequence,
}

impl Scenario {
    /// Reply with these pieces, 20 ms apart, `NativeStop::EndTurn`, input_tokens 7; the
    /// methods below change each of these.
    pub fn reply(pieces: impl IntoIterator<Item = impl ToString>) -> Scenario {
        Scenario::Reply {
            pieces: pieces.into_iter().map(|p| p.to_string()).collect(),
            pace: DEFAULT_PACE,
            stop: NativeStop::EndTurn,
            input_tokens: DEFAULT_INPUT_TOKENS,
        }
    }

    /// Stall after these pieces (see [`Scenario::Stall`]).
    pub fn stall(pieces: impl IntoIterator<Item = impl ToString>) -> Scenario {
        Scenario::Stall {
            pieces: pieces.into_iter().map(|piece| piece.to_string()).collect(),
        }
    }

    /// A [`Scenario::Reply`] or Converse answer with its pieces `every` apart.
    pub fn paced(mut self, every: Duration) -> Scenario {
        match &mut self {
            Scenario::Converse(answer) => answer.pace = every,
            other => *other.reply_field("paced").0 = every,
        }
        self
    }

    /// A [`Scenario::Reply`] that ends with `stop`.
    pub fn stopping(mut self, stop: NativeStop) -> Scenario {
        *self.reply_field("stopping").1 = stop;
        self
    }

    /// A [`Scenario::Reply`] or Converse answer that reports `count` input tokens.
    pub fn input_tokens(mut self, count: u32) -> Scenario {
        match &mut self {
            Scenario::Converse(answer) => answer.input_tokens = count,
            other => *other.reply_field("input_tokens").2 = count,
        }
        self
    }

    fn reply_field(&mut self, method: &str) -> (&mut Duration, &mut NativeStop, &mut u32) {
        match self {
            Scenario::Reply {
                pace,
                stop,
                input_tokens,
                ..
            } => (pace, stop, input_tokens),
            other => panic!("Scenario::{method} applies to a Reply, not to {other:?}"),
        }
    }

    /// An empty Converse answer, `end_turn`, 7 input tokens; the methods below add blocks
    /// and change the rest.
    pub fn converse() -> Scenario {
        Scenario::Converse(ConverseAnswer::new())
    }

    /// A text block of these pieces.
    pub fn text(self, pieces: impl IntoIterator<Item = impl ToString>) -> Scenario {
        self.block(AnswerBlock::Text(strings(pieces)))
    }

    /// A reasoning block of these pieces, then its signature.
    pub fn reasoning(
        self,
        pieces: impl IntoIterator<Item = impl ToString>,
        signature: &str,
    ) -> Scenario {
        self.block(AnswerBlock::Reasoning {
            pieces: strings(pieces),
            signature: Some(signature.into()),
        })
    }

    /// A block of encrypted reasoning.
    pub fn redacted_reasoning(self) -> Scenario {
        self.block(AnswerBlock::RedactedReasoning)
    }

    /// A tool call whose input's JSON text comes in `fragments`; the answer stops with
    /// `tool_use`.
    pub fn tool_use(
        self,
        id: &str,
        name: &str,
        fragments: impl IntoIterator<Item = impl ToString>,
    ) -> Scenario {
        let mut scenario = self.block(AnswerBlock::ToolUse {
            id: id.into(),
            name: name.into(),
            fragments: strings(fragments),
        });
        scenario.converse_field("tool_use").stop_reason = "tool_use".into();
        scenario
    }

    /// Converse's stop reason, as Bedrock words it.
    pub fn stop_reason(mut self, reason: &str) -> Scenario {
        self.converse_field("stop_reason").stop_reason = reason.into();
        self
    }

    /// A guardrail that intervenes: its message as the text, `guardrail_intervened`, and
    /// the guardrail's trace in `metadata`.
    pub fn guardrail_intervention(self, message: &str) -> Scenario {
        let mut scenario = self.text([message]).stop_reason("guardrail_intervened");
        scenario
            .converse_field("guardrail_intervention")
            .guardrail_trace = true;
        scenario
    }

    /// Prompt-cache counts in `metadata`'s usage.
    pub fn cache_tokens(mut self, read: u32, write: u32) -> Scenario {
        let answer = self.converse_field("cache_tokens");
        answer.cache_read_input_tokens = Some(read);
        answer.cache_write_input_tokens = Some(write);
        self
    }

    /// An exception frame of `exception_type` after the blocks, instead of the end.
    pub fn then_exception(mut self, exception_type: &str) -> Scenario {
        self.converse_field("then_exception").exception = Some(exception_type.into());
        self
    }

    fn block(mut self, block: AnswerBlock) -> Scenario {
        self.converse_field("a block").blocks.push(block);
        self
    }

    fn converse_field(&mut self, method: &str) -> &mut ConverseAnswer {
        match self {
            Scenario::Converse(answer) => answer,
            other => panic!("Scenario::{method} applies to a Converse answer, not to {other:?}"),
        }
    }
}

fn strings(pieces: impl IntoIterator<Item = impl ToString>) -> Vec<String> {
    pieces.into_iter().map(|piece| piece.to_string()).collect()
}

impl Emulator {
    /// Binds 127.0.0.1:0, serves in a tokio task, returns at once.
    pub async fn start() -> Emulator {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("emulator: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("emulator: local_addr");
        let state: Shared = Arc::new(Mutex::new(State::default()));
        let acceptor = KillableAcceptor {
            inner: TcpAcceptor::from_tokio(listener).expect("emulator: acceptor"),
            state: state.clone(),
        };
        let st = state.clone();
        let endpoint = poem::endpoint::make(move |req: Request| {
            let st = st.clone();
            async move { handle(st, req).await }
        });
        let task = tokio::spawn(async move {
            let _ = Server::new_with_acceptor(acceptor).run(endpoint).await;
        });
        Emulator { state, addr, task }
    }

    /// `"http://127.0.0.1:PORT"`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sets the behaviour for every later request to this model id (both
    /// operations) until changed. Model ids with no scenario get
    /// `Scenario::reply(["Hello", ", ", "world", "!"])`.
    pub fn script(&self, model_id: &str, scenario: Scenario) {
        lock(&self.state)
            .scenarios
            .insert(model_id.to_string(), scenario);
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.state).requests.clone()
    }

    /// Every STS `AssumeRole` call received so far, in arrival order.
    pub fn assumed_roles(&self) -> Vec<AssumedRole> {
        lock(&self.state).assumed_roles.clone()
    }

    /// Waits until at least `n` response streams have finished, then returns
    /// how every stream that has finished so far ended, in the order they
    /// ended (so the result has `n` or more elements). Panics after `timeout`.
    pub async fn wait_streams_ended(&self, n: usize, timeout: Duration) -> Vec<StreamEnd> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let st = lock(&self.state);
                if st.ended.len() >= n {
                    return st.ended.clone();
                }
                if Instant::now() >= deadline {
                    panic!(
                        "emulator: waited {timeout:?} for {n} ended streams; ended so far: {:?}, still open: {}",
                        st.ended, st.open
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Number of response streams currently being written (started, not yet ended).
    pub fn open_streams(&self) -> usize {
        lock(&self.state).open
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------

const DEFAULT_PACE: Duration = Duration::from_millis(20);
const DEFAULT_INPUT_TOKENS: u32 = 7;
const ERROR_TYPE_SUFFIX: &str = ":http://internal.amazon.com/coral/com.amazon.bedrock/";
const ANTHROPIC_VERSION: &str = "bedrock-2023-05-31";
const ANTHROPIC_MODEL: &str = "claude-3-haiku-20240307";

type Shared = Arc<Mutex<State>>;

#[derive(Default)]
struct State {
    scenarios: HashMap<String, Scenario>,
    requests: Vec<Recorded>,
    assumed_roles: Vec<AssumedRole>,
    ended: Vec<StreamEnd>,
    open: usize,
    /// Kill switch of every open connection, by the client's address.
    connections: HashMap<SocketAddr, Arc<AtomicBool>>,
}

fn lock(state: &Shared) -> MutexGuard<'_, State> {
    // Never let a panic elsewhere (e.g. a failed assertion while holding the
    // lock) poison the emulator.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

fn default_scenario() -> Scenario {
    Scenario::reply(["Hello", ", ", "world", "!"])
}

// ---------------------------------------------------------------------------
// Request handling
// ---------------------------------------------------------------------------

/// The native body family of an InvokeModel request.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    Llama,
    Anthropic,
}

async fn handle(st: Shared, mut req: Request) -> Response {
    let started = Instant::now();
    let path = req.uri().path().to_string();
    if path == "/" && req.method() == poem::http::Method::POST {
        return sts(st, req).await;
    }
    let route = if req.method() == poem::http::Method::POST {
        parse_path(&path)
    } else {
        None
    };
    let Some((raw_id, operation)) = route else {
        return error_response(
            StatusCode::NOT_FOUND,
            "UnknownOperationException",
            "UnknownOperationException",
        );
    };
    let model_id = percent_decode(raw_id);

    let header = |name: &str| {
        req.headers()
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let authorization = header("authorization");
    let content_type = header("content-type");
    let has_amz_date = req.headers().contains_key("x-amz-date");

    let raw_body = match req.take_body().into_vec().await {
        Ok(b) => b,
        Err(e) => {
            return validation_error(&format!("could not read the request body: {e}"));
        }
    };
    let body = if raw_body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice::<Value>(&raw_body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&raw_body).into_owned()))
    };
    lock(&st).requests.push(Recorded {
        model_id: model_id.clone(),
        operation,
        body: body.clone(),
        authorization: authorization.clone(),
        content_type,
    });

    // SigV4 presence check (the signature itself is not verified).
    let signed = authorization.as_deref().is_some_and(|a| {
        a.starts_with("AWS4-HMAC-SHA256 Credential=") && a.contains("/bedrock/aws4_request")
    }) && has_amz_date;
    if !signed {
        return error_response(
            StatusCode::FORBIDDEN,
            "MissingAuthenticationTokenException",
            "Missing Authentication Token",
        );
    }

    // Converse takes any model; the native bodies are those of two families.
    let family = if operation == Operation::ConverseStream {
        if let Err(message) = validate_converse(&body) {
            return validation_error(&message);
        }
        None
    } else if model_id.contains("meta.llama") {
        Some(Family::Llama)
    } else if model_id.contains("anthropic.") {
        Some(Family::Anthropic)
    } else {
        return bedrock_error(
            StatusCode::BAD_REQUEST,
            "ValidationException",
            "The provided model identifier is invalid.",
        );
    };

    if let Some(family) = family
        && let Err(detail) = validate(family, &raw_body, &body)
    {
        return validation_error(&format!(
            "Malformed input request: {detail}, please reformat your input and try again."
        ));
    }

    let stop_sequence = body
        .get("stop_sequences")
        .and_then(|s| s.get(0))
        .and_then(|s| s.as_str())
        .map(str::to_string);

    let scenario = lock(&st)
        .scenarios
        .get(&model_id)
        .cloned()
        .unwrap_or_else(default_scenario);

    let kill = req
        .remote_addr()
        .0
        .as_socket_addr()
        .and_then(|a| lock(&st).connections.get(a).cloned());
    let ctx = Ctx {
        stop_sequence,
        started,
        kill,
    };

    if let Scenario::HttpError {
        status,
        error_type,
        message,
    } = &scenario
    {
        let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return bedrock_error(status, error_type, message);
    }

    let family = match (family, &scenario) {
        (None, _) => {
            let (input_tokens, output_tokens) = converse_usage(&scenario);
            let steps = plan_converse(&scenario);
            return stream_response(st, ctx, steps, input_tokens, output_tokens);
        }
        (Some(_), Scenario::Converse(_)) => {
            return validation_error(
                "emulator: a Converse answer is scripted for this model; call it with ConverseStream",
            );
        }
        (Some(family), _) => family,
    };
    match operation {
        Operation::Invoke if matches!(scenario, Scenario::Stall { .. }) => {
            stalled_invoke_response(st)
        }
        Operation::Invoke => invoke_response(&ctx, family, &scenario),
        _ => {
            let steps = plan_stream(&ctx, family, &scenario);
            let (pieces, _, input_tokens) = reply_parts(&scenario);
            stream_response(st, ctx, steps, input_tokens, pieces.len())
        }
    }
}

/// `/model/{id}/invoke`, `/model/{id}/invoke-with-response-stream` or
/// `/model/{id}/converse-stream`, matched on the raw path so that ids with `%2F`
/// (or even a literal `/`) route. (The gateway never calls Converse: it is not
/// emulated.)
fn parse_path(path: &str) -> Option<(&str, Operation)> {
    let rest = path.strip_prefix("/model/")?;
    let (id, op) = if let Some(id) = rest.strip_suffix("/invoke-with-response-stream") {
        (id, Operation::InvokeStream)
    } else if let Some(id) = rest.strip_suffix("/converse-stream") {
        (id, Operation::ConverseStream)
    } else if let Some(id) = rest.strip_suffix("/invoke") {
        (id, Operation::Invoke)
    } else {
        return None;
    };
    if id.is_empty() { None } else { Some((id, op)) }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------
// Validation (Bedrock-style JSON-schema messages)
// ---------------------------------------------------------------------------

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "Null",
        Value::Bool(_) => "Boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "Integer",
        Value::Number(_) => "BigDecimal",
        Value::String(_) => "String",
        Value::Array(_) => "JSONArray",
        Value::Object(_) => "JSONObject",
    }
}

fn check_number(
    obj: &serde_json::Map<String, Value>,
    key: &str,
    min: f64,
    max: f64,
) -> Result<(), String> {
    match obj.get(key) {
        None => Ok(()),
        Some(v) => {
            let Some(x) = v.as_f64() else {
                return Err(format!(
                    "#/{key}: expected type: Number, found: {}",
                    json_type(v)
                ));
            };
            if x < min {
                Err(format!("#/{key}: {v} is not greater or equal to {min}"))
            } else if x > max {
                Err(format!("#/{key}: {v} is not less or equal to {max}"))
            } else {
                Ok(())
            }
        }
    }
}

fn check_integer(
    obj: &serde_json::Map<String, Value>,
    key: &str,
    min: i64,
    max: Option<i64>,
) -> Result<(), String> {
    match obj.get(key) {
        None => Ok(()),
        Some(v) => {
            let Some(x) = v.as_i64() else {
                return Err(format!(
                    "#/{key}: expected type: Integer, found: {}",
                    json_type(v)
                ));
            };
            if x < min {
                Err(format!("#/{key}: {x} is not greater or equal to {min}"))
            } else if let Some(max) = max.filter(|m| x > *m) {
                Err(format!("#/{key}: {x} is not less or equal to {max}"))
            } else {
                Ok(())
            }
        }
    }
}

fn validate(family: Family, raw: &[u8], body: &Value) -> Result<(), String> {
    let obj = match body {
        Value::Object(obj) => obj,
        Value::String(_) if serde_json::from_slice::<Value>(raw).is_err() => {
            return Err("Unexpected token in the request body, expected a JSON object".into());
        }
        Value::Null if raw.is_empty() => {
            return Err("#: expected type: JSONObject, found: empty body".into());
        }
        other => {
            return Err(format!(
                "#: expected type: JSONObject, found: {}",
                json_type(other)
            ));
        }
    };
    let (allowed, required): (&[&str], &[&str]) = match family {
        Family::Llama => (
            &["prompt", "max_gen_len", "temperature", "top_p"],
            &["prompt"],
        ),
        Family::Anthropic => (
            &[
                "anthropic_version",
                "max_tokens",
                "messages",
                "system",
                "temperature",
                "top_p",
                "top_k",
                "stop_sequences",
            ],
            &["anthropic_version", "max_tokens", "messages"],
        ),
    };
    let mut problems = Vec::new();
    for key in required {
        if !obj.contains_key(*key) {
            problems.push(format!("#: required key [{key}] not found"));
        }
    }
    for key in obj.keys() {
        if !allowed.contains(&key.as_str()) {
            problems.push(format!("#: extraneous key [{key}] is not permitted"));
        }
    }
    let mut check = |r: Result<(), String>| {
        if let Err(e) = r {
            problems.push(e);
        }
    };
    match family {
        Family::Llama => {
            if let Some(p) = obj.get("prompt").filter(|p| !p.is_string()) {
                check(Err(format!(
                    "#/prompt: expected type: String, found: {}",
                    json_type(p)
                )));
            }
            check(check_integer(obj, "max_gen_len", 1, Some(2048)));
            check(check_number(obj, "temperature", 0.0, 1.0));
            check(check_number(obj, "top_p", 0.0, 1.0));
        }
        Family::Anthropic => {
            if let Some(v) = obj.get("anthropic_version")
                && v.as_str() != Some(ANTHROPIC_VERSION)
            {
                check(Err(format!(
                    "#/anthropic_version: {v} is not a valid enum value, expected: {ANTHROPIC_VERSION}"
                )));
            }
            check(check_integer(obj, "max_tokens", 1, None));
            match obj.get("messages") {
                None => {}
                Some(Value::Array(a)) if a.is_empty() => check(Err(
                    "#/messages: expected minimum item count: 1, found: 0".into(),
                )),
                Some(Value::Array(_)) => {}
                Some(v) => check(Err(format!(
                    "#/messages: expected type: JSONArray, found: {}",
                    json_type(v)
                ))),
            }
            check(check_number(obj, "temperature", 0.0, 1.0));
            check(check_number(obj, "top_p", 0.0, 1.0));
            check(check_integer(obj, "top_k", 0, None));
            match obj.get("stop_sequences") {
                None | Some(Value::Array(_)) => {}
                Some(v) => check(Err(format!(
                    "#/stop_sequences: expected type: JSONArray, found: {}",
                    json_type(v)
                ))),
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join(", "))
    }
}

// ---------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------

struct Ctx {
    stop_sequence: Option<String>,
    started: Instant,
    /// Kill switch of the connection this request came on.
    kill: Option<Arc<AtomicBool>>,
}

fn request_id() -> String {
    let a = random_u64();
    let b = random_u64();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        (b >> 48) | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

fn error_response(status: StatusCode, error_type_header: &str, message: &str) -> Response {
    Response::builder()
        .status(status)
        .header("x-amzn-ErrorType", error_type_header)
        .header("x-amzn-RequestId", request_id())
        .content_type("application/json")
        .body(json!({ "message": message }).to_string())
}

fn bedrock_error(status: StatusCode, error_type: &str, message: &str) -> Response {
    error_response(status, &format!("{error_type}{ERROR_TYPE_SUFFIX}"), message)
}

fn validation_error(message: &str) -> Response {
    bedrock_error(StatusCode::BAD_REQUEST, "ValidationException", message)
}

/// The reply a scenario gives on `Invoke` (everything but `HttpError`).
fn reply_parts(scenario: &Scenario) -> (&[String], NativeStop, u32) {
    match scenario {
        Scenario::Reply {
            pieces,
            stop,
            input_tokens,
            ..
        } => (pieces, *stop, *input_tokens),
        Scenario::ExceptionAfter { pieces, .. }
        | Scenario::ErrorFrameAfter { pieces, .. }
        | Scenario::DropAfter { pieces }
        | Scenario::Stall { pieces } => (pieces, NativeStop::EndTurn, DEFAULT_INPUT_TOKENS),
        Scenario::HttpError { .. } | Scenario::Converse(_) => {
            (&[], NativeStop::EndTurn, DEFAULT_INPUT_TOKENS)
        }
    }
}

fn llama_stop(stop: NativeStop) -> &'static str {
    match stop {
        NativeStop::EndTurn | NativeStop::StopSequence => "stop",
        NativeStop::MaxTokens => "length",
    }
}

fn anthropic_stop(stop: NativeStop) -> &'static str {
    match stop {
        NativeStop::EndTurn => "end_turn",
        NativeStop::MaxTokens => "max_tokens",
        NativeStop::StopSequence => "stop_sequence",
    }
}

fn anthropic_stop_sequence(ctx: &Ctx, stop: NativeStop) -> Value {
    match (stop, &ctx.stop_sequence) {
        (NativeStop::StopSequence, Some(s)) => Value::String(s.clone()),
        _ => Value::Null,
    }
}

fn message_id() -> String {
    format!("msg_bdrk_01{}", random_letters(22, true))
}

fn invoke_response(ctx: &Ctx, family: Family, scenario: &Scenario) -> Response {
    let (pieces, stop, input_tokens) = reply_parts(scenario);
    let joined: String = pieces.concat();
    let output_tokens = pieces.len();
    let native = match family {
        Family::Llama => json!({
            "generation": joined,
            "prompt_token_count": input_tokens,
            "generation_token_count": output_tokens,
            "stop_reason": llama_stop(stop),
        }),
        Family::Anthropic => json!({
            "id": message_id(),
            "type": "message",
            "role": "assistant",
            "model": ANTHROPIC_MODEL,
            "content": [{"type": "text", "text": joined}],
            "stop_reason": anthropic_stop(stop),
            "stop_sequence": anthropic_stop_sequence(ctx, stop),
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
        }),
    };
    let text = native.to_string();
    let builder = Response::builder()
        .status(StatusCode::OK)
        .content_type("application/json")
        .header("x-amzn-RequestId", request_id())
        .header("X-Amzn-Bedrock-Input-Token-Count", input_tokens.to_string())
        .header(
            "X-Amzn-Bedrock-Output-Token-Count",
            output_tokens.to_string(),
        )
        .header(
            "X-Amzn-Bedrock-Invocation-Latency",
            ctx.started.elapsed().as_millis().to_string(),
        );
    if let Scenario::DropAfter { .. } = scenario {
        // Half the JSON, then abort the connection.
        let first = text.as_bytes()[..text.len() / 2].to_vec();
        let kill = ctx.kill.clone();
        let stream = futures_util::stream::unfold(Some(first), move |first| {
            let kill = kill.clone();
            async move {
                match first {
                    Some(first) => Some((Ok(first), None)),
                    None => Some((Err(abort_connection(kill.as_deref()).await), None)),
                }
            }
        });
        return builder.body(Body::from_bytes_stream(stream));
    }
    builder.body(text)
}

/// An InvokeModel answer that never comes: headers, then only spaces (valid leading JSON
/// whitespace) as heartbeats, with a guard that records the client leaving.
fn stalled_invoke_response(st: Shared) -> Response {
    let guard = StreamGuard::new(st);
    let body = futures_util::stream::unfold(guard, |guard| async move {
        tokio::time::sleep(HEARTBEAT).await;
        Some((Ok::<_, std::io::Error>(b" ".to_vec()), guard))
    });
    Response::builder()
        .status(StatusCode::OK)
        .content_type("application/json")
        .header("x-amzn-RequestId", request_id())
        .body(Body::from_bytes_stream(body))
}

/// Aborts the connection the response is being written on, so that the
/// chunked body is never terminated. Returns the error the body stream must
/// yield next.
///
/// A body error alone is not enough: hyper does stop there, but poem's
/// server then polls the finished connection once more (graceful shutdown)
/// and hyper writes the terminating `0\r\n\r\n` chunk, turning the drop into
/// a clean end. So the connection's I/O is made to fail first.
async fn abort_connection(kill: Option<&AtomicBool>) -> std::io::Error {
    // Give hyper a turn to flush the frames produced before the drop.
    tokio::time::sleep(Duration::from_millis(10)).await;
    if let Some(kill) = kill {
        kill.store(true, Ordering::SeqCst);
    }
    std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        "emulator: connection dropped on purpose (DropAfter)",
    )
}

// ---------------------------------------------------------------------------
// Event streams
// ---------------------------------------------------------------------------

enum Step {
    /// A `chunk` event carrying `native` (base64'd). `metrics`: add
    /// `amazon-bedrock-invocationMetrics` when it is sent.
    Chunk {
        delay: Duration,
        native: Value,
        metrics: bool,
    },
    /// A ConverseStream event: `:event-type` names it, the payload is its JSON
    /// (a `metadata` event gets its `metrics` when it is sent).
    Event {
        delay: Duration,
        event_type: &'static str,
        payload: Value,
    },
    Exception {
        delay: Duration,
        exception_type: String,
        payload: Value,
    },
    ErrorFrame {
        delay: Duration,
        code: String,
        message: String,
    },
    Abort,
    /// No more text: only heartbeats, forever.
    Stall,
}

fn plan_stream(ctx: &Ctx, family: Family, scenario: &Scenario) -> VecDeque<Step> {
    let mut steps = VecDeque::new();
    let (pieces, pace, stop, input_tokens, complete) = match scenario {
        Scenario::Reply {
            pieces,
            pace,
            stop,
            input_tokens,
        } => (pieces.as_slice(), *pace, *stop, *input_tokens, true),
        Scenario::ExceptionAfter { pieces, .. }
        | Scenario::ErrorFrameAfter { pieces, .. }
        | Scenario::DropAfter { pieces }
        | Scenario::Stall { pieces } => (
            pieces.as_slice(),
            DEFAULT_PACE,
            NativeStop::EndTurn,
            DEFAULT_INPUT_TOKENS,
            false,
        ),
        Scenario::HttpError { .. } | Scenario::Converse(_) => return steps,
    };
    let n = pieces.len();
    let piece_delay = |i: usize| if i == 0 { Duration::ZERO } else { pace };
    let chunk = |native: Value| Step::Chunk {
        delay: Duration::ZERO,
        native,
        metrics: false,
    };
    match family {
        Family::Llama => {
            for (i, piece) in pieces.iter().enumerate() {
                steps.push_back(Step::Chunk {
                    delay: piece_delay(i),
                    native: json!({
                        "generation": piece,
                        "prompt_token_count": if i == 0 { json!(input_tokens) } else { Value::Null },
                        "generation_token_count": i + 1,
                        "stop_reason": null,
                    }),
                    metrics: false,
                });
            }
            if complete {
                steps.push_back(Step::Chunk {
                    delay: Duration::ZERO,
                    native: json!({
                        "generation": "",
                        "prompt_token_count": if n == 0 { json!(input_tokens) } else { Value::Null },
                        "generation_token_count": n,
                        "stop_reason": llama_stop(stop),
                    }),
                    metrics: true,
                });
            }
        }
        Family::Anthropic => {
            steps.push_back(chunk(json!({
                "type": "message_start",
                "message": {
                    "id": message_id(),
                    "type": "message",
                    "role": "assistant",
                    "model": ANTHROPIC_MODEL,
                    "content": [],
                    "stop_reason": null,
                    "stop_sequence": null,
                    "usage": {"input_tokens": input_tokens, "output_tokens": 1},
                },
            })));
            steps.push_back(chunk(json!({
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            })));
            for (i, piece) in pieces.iter().enumerate() {
                steps.push_back(Step::Chunk {
                    delay: piece_delay(i),
                    native: json!({
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": piece},
                    }),
                    metrics: false,
                });
            }
            if complete {
                steps.push_back(chunk(json!({"type": "content_block_stop", "index": 0})));
                steps.push_back(chunk(json!({
                    "type": "message_delta",
                    "delta": {
                        "stop_reason": anthropic_stop(stop),
                        "stop_sequence": anthropic_stop_sequence(ctx, stop),
                    },
                    "usage": {"output_tokens": n},
                })));
                steps.push_back(Step::Chunk {
                    delay: Duration::ZERO,
                    native: json!({"type": "message_stop"}),
                    metrics: true,
                });
            }
        }
    }
    push_fault(&mut steps, scenario);
    steps
}

/// The fault of a scenario, right after its last piece.
fn push_fault(steps: &mut VecDeque<Step>, scenario: &Scenario) {
    match scenario {
        Scenario::ExceptionAfter {
            exception_type,
            message,
            ..
        } => {
            let payload = if exception_type == "modelStreamErrorException" {
                json!({"message": message, "originalStatusCode": 500, "originalMessage": message})
            } else {
                json!({ "message": message })
            };
            steps.push_back(Step::Exception {
                delay: Duration::ZERO,
                exception_type: exception_type.clone(),
                payload,
            });
        }
        Scenario::ErrorFrameAfter { code, message, .. } => steps.push_back(Step::ErrorFrame {
            delay: Duration::ZERO,
            code: code.clone(),
            message: message.clone(),
        }),
        Scenario::DropAfter { .. } => steps.push_back(Step::Abort),
        Scenario::Stall { .. } => steps.push_back(Step::Stall),
        Scenario::Converse(ConverseAnswer {
            exception: Some(exception_type),
            ..
        }) => steps.push_back(Step::Exception {
            delay: Duration::ZERO,
            exception_type: exception_type.clone(),
            payload: json!({"message": format!("{exception_type} from the emulator")}),
        }),
        _ => {}
    }
}

fn encode_frame(headers: Vec<(&'static str, String)>, payload: Vec<u8>) -> Vec<u8> {
    let mut message = Message::new(payload);
    for (name, value) in headers {
        message = message.add_header(Header::new(name, HeaderValue::String(value.into())));
    }
    let mut out = Vec::new();
    if let Err(e) = write_message_to(&message, &mut out) {
        // Only possible for absurd header sizes; surface it loudly in the
        // stream rather than panicking in the server.
        eprintln!("emulator: could not encode an event-stream frame: {e}");
    }
    out
}

/// How often a stalled answer writes a heartbeat.
const HEARTBEAT: Duration = Duration::from_millis(100);

/// An event of a type the SDK does not model: it yields `ResponseStream::Unknown`.
fn heartbeat_frame() -> Vec<u8> {
    encode_frame(
        vec![
            (":message-type", "event".into()),
            (":event-type", "emulatorHeartbeat".into()),
            (":content-type", "application/json".into()),
        ],
        b"{}".to_vec(),
    )
}

/// A ConverseStream event, padded with a random `p` field as Bedrock pads them.
fn event_frame(event_type: &str, mut payload: Value) -> Vec<u8> {
    if let Value::Object(obj) = &mut payload {
        let pad_len = (random_u64() % 40) as usize + 1;
        obj.insert("p".into(), Value::String(random_letters(pad_len, false)));
    }
    encode_frame(
        vec![
            (":message-type", "event".into()),
            (":event-type", event_type.into()),
            (":content-type", "application/json".into()),
        ],
        payload.to_string().into_bytes(),
    )
}

fn chunk_frame(native: &Value) -> Vec<u8> {
    let bytes = base64::engine::general_purpose::STANDARD.encode(native.to_string());
    let pad_len = (random_u64() % 40) as usize + 1;
    let payload = json!({"bytes": bytes, "p": random_letters(pad_len, false)});
    encode_frame(
        vec![
            (":message-type", "event".into()),
            (":event-type", "chunk".into()),
            (":content-type", "application/json".into()),
        ],
        payload.to_string().into_bytes(),
    )
}

/// Records how the stream ended: `Completed` via `finish`, otherwise
/// `ClientClosed` when dropped (hyper drops the body when the client is gone).
struct StreamGuard {
    st: Shared,
    chunks: usize,
    done: bool,
}

impl StreamGuard {
    fn new(st: Shared) -> StreamGuard {
        lock(&st).open += 1;
        StreamGuard {
            st,
            chunks: 0,
            done: false,
        }
    }

    fn end(&mut self, how: StreamEnd) {
        if !self.done {
            self.done = true;
            let mut st = lock(&self.st);
            st.open = st.open.saturating_sub(1);
            st.ended.push(how);
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let after_chunks = self.chunks;
        self.end(StreamEnd::ClientClosed { after_chunks });
    }
}

struct Writer {
    steps: VecDeque<Step>,
    guard: StreamGuard,
    started: Instant,
    first_byte: Option<Duration>,
    input_tokens: u32,
    output_tokens: usize,
    kill: Option<Arc<AtomicBool>>,
}

fn stream_response(
    st: Shared,
    ctx: Ctx,
    steps: VecDeque<Step>,
    input_tokens: u32,
    output_tokens: usize,
) -> Response {
    let writer = Writer {
        steps,
        guard: StreamGuard::new(st),
        started: ctx.started,
        first_byte: None,
        input_tokens,
        output_tokens,
        kill: ctx.kill.clone(),
    };
    let stream = futures_util::stream::unfold(writer, |mut w| async move {
        let step = w.steps.pop_front()?;
        let delay = match &step {
            Step::Chunk { delay, .. }
            | Step::Event { delay, .. }
            | Step::Exception { delay, .. }
            | Step::ErrorFrame { delay, .. } => *delay,
            Step::Abort => Duration::ZERO,
            Step::Stall => HEARTBEAT,
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let first_byte = *w.first_byte.get_or_insert_with(|| w.started.elapsed());
        let item: Result<Vec<u8>, std::io::Error> = match step {
            Step::Chunk {
                mut native,
                metrics,
                ..
            } => {
                if metrics && let Value::Object(obj) = &mut native {
                    obj.insert(
                        "amazon-bedrock-invocationMetrics".into(),
                        json!({
                            "inputTokenCount": w.input_tokens,
                            "outputTokenCount": w.output_tokens,
                            "invocationLatency": w.started.elapsed().as_millis() as u64,
                            "firstByteLatency": first_byte.as_millis() as u64,
                        }),
                    );
                }
                w.guard.chunks += 1;
                Ok(chunk_frame(&native))
            }
            Step::Event {
                event_type,
                mut payload,
                ..
            } => {
                if event_type == "metadata"
                    && let Value::Object(obj) = &mut payload
                {
                    obj.insert(
                        "metrics".into(),
                        json!({"latencyMs": w.started.elapsed().as_millis() as u64}),
                    );
                }
                w.guard.chunks += 1;
                Ok(event_frame(event_type, payload))
            }
            Step::Exception {
                exception_type,
                payload,
                ..
            } => Ok(encode_frame(
                vec![
                    (":message-type", "exception".into()),
                    (":exception-type", exception_type),
                    (":content-type", "application/json".into()),
                ],
                payload.to_string().into_bytes(),
            )),
            Step::ErrorFrame { code, message, .. } => Ok(encode_frame(
                vec![
                    (":message-type", "error".into()),
                    (":error-code", code),
                    (":error-message", message),
                ],
                Vec::new(),
            )),
            Step::Abort => Err(abort_connection(w.kill.as_deref()).await),
            Step::Stall => {
                w.steps.push_front(Step::Stall);
                Ok(heartbeat_frame())
            }
        };
        if w.steps.is_empty() {
            w.guard.end(StreamEnd::Completed);
        }
        Some((item, w))
    });
    Response::builder()
        .status(StatusCode::OK)
        .content_type("application/vnd.amazon.eventstream")
        .header("X-Amzn-Bedrock-Content-Type", "application/json")
        .header("x-amzn-RequestId", request_id())
        .body(Body::from_bytes_stream(stream))
}

// ---------------------------------------------------------------------------
// Converse
// ---------------------------------------------------------------------------

/// What a scenario's answer reports in `metadata`: input tokens, and one output
/// token per delta.
fn converse_usage(scenario: &Scenario) -> (u32, usize) {
    match scenario {
        Scenario::Converse(answer) => {
            let deltas = answer
                .blocks
                .iter()
                .map(|block| match block {
                    AnswerBlock::Text(pieces) | AnswerBlock::Reasoning { pieces, .. } => {
                        pieces.len()
                    }
                    AnswerBlock::RedactedReasoning => 1,
                    AnswerBlock::ToolUse { fragments, .. } => fragments.len(),
                })
                .sum();
            (answer.input_tokens, deltas)
        }
        other => {
            let (pieces, _, input_tokens) = reply_parts(other);
            (input_tokens, pieces.len())
        }
    }
}

fn converse_stop(stop: NativeStop) -> &'static str {
    // Converse uses the words of Claude's Messages API.
    anthropic_stop(stop)
}

/// The ConverseStream events of a scenario: a Converse answer's blocks, or any other
/// scenario's pieces as one text block, with the same faults as the native stream.
fn plan_converse(scenario: &Scenario) -> VecDeque<Step> {
    let mut steps = VecDeque::new();
    let text_answer;
    let (answer, complete) = match scenario {
        Scenario::Converse(answer) => (answer, answer.exception.is_none()),
        Scenario::HttpError { .. } => return steps,
        other => {
            let (pieces, stop, input_tokens) = reply_parts(other);
            let pace = match other {
                Scenario::Reply { pace, .. } => *pace,
                _ => DEFAULT_PACE,
            };
            text_answer = ConverseAnswer {
                blocks: vec![AnswerBlock::Text(pieces.to_vec())],
                pace,
                stop_reason: converse_stop(stop).into(),
                input_tokens,
                ..ConverseAnswer::new()
            };
            (&text_answer, matches!(other, Scenario::Reply { .. }))
        }
    };
    let event = |event_type: &'static str, delay: Duration, payload: Value| Step::Event {
        delay,
        event_type,
        payload,
    };
    steps.push_back(event(
        "messageStart",
        Duration::ZERO,
        json!({"role": "assistant"}),
    ));
    let mut first_delta = true;
    let mut pace = || {
        if std::mem::take(&mut first_delta) {
            Duration::ZERO
        } else {
            answer.pace
        }
    };
    for (index, block) in answer.blocks.iter().enumerate() {
        let delta = |delay: Duration, delta: Value| {
            event(
                "contentBlockDelta",
                delay,
                json!({"delta": delta, "contentBlockIndex": index}),
            )
        };
        match block {
            AnswerBlock::Text(pieces) => {
                for piece in pieces {
                    steps.push_back(delta(pace(), json!({ "text": piece })));
                }
            }
            AnswerBlock::Reasoning { pieces, signature } => {
                for piece in pieces {
                    steps.push_back(delta(pace(), json!({"reasoningContent": {"text": piece}})));
                }
                if let Some(signature) = signature {
                    steps.push_back(delta(
                        Duration::ZERO,
                        json!({"reasoningContent": {"signature": signature}}),
                    ));
                }
            }
            AnswerBlock::RedactedReasoning => {
                let encrypted =
                    base64::engine::general_purpose::STANDARD.encode(random_letters(32, true));
                steps.push_back(delta(
                    pace(),
                    json!({"reasoningContent": {"redactedContent": encrypted}}),
                ));
            }
            AnswerBlock::ToolUse {
                id,
                name,
                fragments,
            } => {
                steps.push_back(event(
                    "contentBlockStart",
                    pace(),
                    json!({"start": {"toolUse": {"toolUseId": id, "name": name}}, "contentBlockIndex": index}),
                ));
                for fragment in fragments {
                    steps.push_back(delta(answer.pace, json!({"toolUse": {"input": fragment}})));
                }
            }
        }
        // The last block of an answer cut by a fault stays open.
        if complete || index + 1 < answer.blocks.len() {
            steps.push_back(event(
                "contentBlockStop",
                Duration::ZERO,
                json!({ "contentBlockIndex": index }),
            ));
        }
    }
    if complete {
        steps.push_back(event(
            "messageStop",
            Duration::ZERO,
            json!({"stopReason": answer.stop_reason}),
        ));
        let (input_tokens, output_tokens) = converse_usage(scenario);
        let mut usage = json!({
            "inputTokens": input_tokens,
            "outputTokens": output_tokens,
            "totalTokens": input_tokens as usize + output_tokens,
        });
        if let Some(read) = answer.cache_read_input_tokens {
            usage["cacheReadInputTokens"] = json!(read);
        }
        if let Some(write) = answer.cache_write_input_tokens {
            usage["cacheWriteInputTokens"] = json!(write);
        }
        let mut metadata = json!({ "usage": usage });
        if answer.guardrail_trace {
            metadata["trace"] =
                json!({"guardrail": {"modelOutput": ["the answer the guardrail blocked"]}});
        }
        steps.push_back(event("metadata", Duration::ZERO, metadata));
    }
    push_fault(&mut steps, scenario);
    steps
}

const CONVERSE_KEYS: &[&str] = &[
    "messages",
    "system",
    "inferenceConfig",
    "toolConfig",
    "guardrailConfig",
    "additionalModelRequestFields",
    "additionalModelResponseFieldPaths",
    "requestMetadata",
    "performanceConfig",
    "promptVariables",
    "serviceTier",
    "outputConfig",
];

const CONTENT_BLOCK_KEYS: &[&str] = &[
    "text",
    "image",
    "document",
    "video",
    "audio",
    "toolUse",
    "toolResult",
    "guardContent",
    "cachePoint",
    "reasoningContent",
    "citationsContent",
    "searchResult",
];

/// Bedrock's checks of a Converse request, with its messages.
fn validate_converse(body: &Value) -> Result<(), String> {
    let Value::Object(obj) = body else {
        return Err("The request body must be a JSON object.".into());
    };
    if let Some(key) = obj
        .keys()
        .find(|key| !CONVERSE_KEYS.contains(&key.as_str()))
    {
        return Err(format!("Unknown field in the request: {key}."));
    }
    let Some(messages) = obj.get("messages").and_then(Value::as_array) else {
        return Err("1 validation error detected: Value null at 'messages' failed to satisfy constraint: Member must not be null".into());
    };
    let mut holds_tools = false;
    let mut previous_calls: Vec<&str> = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        let role = message["role"].as_str().unwrap_or_default();
        let expected = if i % 2 == 0 { "user" } else { "assistant" };
        if i == 0 && role != "user" {
            return Err("A conversation must start with a user message. Try again with a conversation that starts with a user message.".into());
        }
        if role != expected {
            return Err("A conversation must alternate between user and assistant roles. Make sure the conversation alternates between user and assistant roles and try again.".into());
        }
        let blocks = message["content"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        if blocks.is_empty() {
            return Err(format!(
                "The content field in the Message object at messages.{i} is empty. Add a ContentBlock object to the content field and try again."
            ));
        }
        let mut calls = Vec::new();
        for (j, block) in blocks.iter().enumerate() {
            let at = format!("messages.{i}.content.{j}");
            let keys: Vec<&str> = block
                .as_object()
                .map(|b| b.keys().map(String::as_str).collect())
                .unwrap_or_default();
            let [key] = keys.as_slice() else {
                return Err(format!(
                    "The ContentBlock object at {at} must set exactly one of: {}.",
                    CONTENT_BLOCK_KEYS.join(", ")
                ));
            };
            let member = &block[*key];
            match *key {
                "text" if member.as_str().is_none_or(|t| t.trim().is_empty()) => {
                    return Err(format!(
                        "The text field in the ContentBlock object at {at} is blank. Add text to the text field, and try again."
                    ));
                }
                "image" => validate_media(member, &at, &["png", "jpeg", "gif", "webp"])?,
                "document" => {
                    validate_media(
                        member,
                        &at,
                        &[
                            "pdf", "csv", "doc", "docx", "xls", "xlsx", "html", "txt", "md",
                        ],
                    )?;
                    if member["name"].as_str().is_none_or(str::is_empty) {
                        return Err(format!("The document at {at} needs a name."));
                    }
                }
                "toolUse" => {
                    holds_tools = true;
                    if role != "assistant" {
                        return Err(format!(
                            "The toolUse block at {at} must be in an assistant message."
                        ));
                    }
                    calls.push(member["toolUseId"].as_str().unwrap_or_default());
                }
                "toolResult" => {
                    holds_tools = true;
                    let id = member["toolUseId"].as_str().unwrap_or_default();
                    if !previous_calls.contains(&id) {
                        return Err(format!(
                            "The toolResult block at {at} has toolUseId {id}, which the previous assistant message did not use."
                        ));
                    }
                }
                "text" | "cachePoint" | "reasoningContent" => {}
                other if CONTENT_BLOCK_KEYS.contains(&other) => {}
                other => {
                    return Err(format!(
                        "The ContentBlock object at {at} has an unknown key: {other}."
                    ));
                }
            }
        }
        previous_calls = calls;
    }
    if holds_tools && obj.get("toolConfig").is_none() {
        return Err("The toolConfig field must be defined when using toolUse and toolResult content blocks.".into());
    }
    if let Some(config) = obj.get("toolConfig") {
        let tools = config["tools"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        if tools.is_empty() {
            return Err("The toolConfig field must hold at least one tool.".into());
        }
        for (k, tool) in tools.iter().enumerate() {
            let spec = &tool["toolSpec"];
            if tool.get("cachePoint").is_none()
                && (spec["name"].as_str().is_none() || !spec["inputSchema"]["json"].is_object())
            {
                return Err(format!(
                    "The tool at toolConfig.tools.{k} needs a toolSpec with a name and an inputSchema.json."
                ));
            }
        }
    }
    if let Some(inference) = obj.get("inferenceConfig") {
        if inference
            .get("maxTokens")
            .is_some_and(|n| n.as_i64().is_none_or(|n| n < 1))
        {
            return Err("The maximum tokens you requested must be at least 1.".into());
        }
        for key in ["temperature", "topP"] {
            if inference
                .get(key)
                .is_some_and(|v| v.as_f64().is_none_or(|v| !(0.0..=1.0).contains(&v)))
            {
                return Err(format!("inferenceConfig.{key} must be between 0 and 1."));
            }
        }
    }
    if let Some(guardrail) = obj.get("guardrailConfig")
        && (guardrail["guardrailIdentifier"].as_str().is_none()
            || guardrail["guardrailVersion"].as_str().is_none())
    {
        return Err(
            "The guardrailConfig field needs a guardrailIdentifier and a guardrailVersion.".into(),
        );
    }
    Ok(())
}

/// An image or document: a known `format` and base64 `source.bytes`.
fn validate_media(member: &Value, at: &str, formats: &[&str]) -> Result<(), String> {
    let format = member["format"].as_str().unwrap_or_default();
    if !formats.contains(&format) {
        return Err(format!(
            "The format {format} at {at} is not supported; use one of: {}.",
            formats.join(", ")
        ));
    }
    let bytes = member["source"]["bytes"].as_str().unwrap_or_default();
    match base64::engine::general_purpose::STANDARD.decode(bytes) {
        Ok(decoded) if !decoded.is_empty() => Ok(()),
        _ => Err(format!("The source at {at} must hold base64 bytes.")),
    }
}

// ---------------------------------------------------------------------------
// STS AssumeRole (query protocol, XML answers)
// ---------------------------------------------------------------------------

async fn sts(st: Shared, mut req: Request) -> Response {
    let authorization = req
        .headers()
        .get("authorization")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let body = req.take_body().into_string().await.unwrap_or_default();
    let form: HashMap<String, String> = body
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(key, value)| (form_decode(key), form_decode(value)))
        .collect();
    if form.get("Action").map(String::as_str) != Some("AssumeRole") {
        return sts_error(
            StatusCode::BAD_REQUEST,
            "InvalidAction",
            "Could not find operation",
        );
    }
    let signed = authorization.as_deref().is_some_and(|a| {
        a.starts_with("AWS4-HMAC-SHA256 Credential=") && a.contains("/sts/aws4_request")
    });
    if !signed {
        return sts_error(
            StatusCode::FORBIDDEN,
            "MissingAuthenticationToken",
            "Request is missing Authentication Token",
        );
    }
    let (Some(role_arn), Some(session_name)) = (form.get("RoleArn"), form.get("RoleSessionName"))
    else {
        return sts_error(
            StatusCode::BAD_REQUEST,
            "ValidationError",
            "2 validation errors detected: RoleArn and RoleSessionName must not be null",
        );
    };
    lock(&st).assumed_roles.push(AssumedRole {
        role_arn: role_arn.clone(),
        external_id: form.get("ExternalId").cloned(),
        session_name: Some(session_name.clone()),
        authorization,
    });
    if role_arn.ends_with(DENIED_ROLE_SUFFIX) {
        return sts_error(
            StatusCode::FORBIDDEN,
            "AccessDenied",
            &format!(
                "User: arn:aws:iam::123456789012:user/gateway is not authorized to perform: sts:AssumeRole on resource: {role_arn}"
            ),
        );
    }
    let expiration = std::time::SystemTime::now() + Duration::from_secs(3600);
    let expiration = aws_smithy_types::DateTime::from(expiration)
        .fmt(aws_smithy_types::date_time::Format::DateTime)
        .unwrap_or_default();
    let role_name = role_arn.rsplit('/').next().unwrap_or_default();
    let xml = format!(
        r#"<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleResult>
    <AssumedRoleUser>
      <Arn>arn:aws:sts::123456789012:assumed-role/{role_name}/{session_name}</Arn>
      <AssumedRoleId>AROAEMULATOR:{session_name}</AssumedRoleId>
    </AssumedRoleUser>
    <Credentials>
      <AccessKeyId>{ASSUMED_ACCESS_KEY}</AccessKeyId>
      <SecretAccessKey>{}</SecretAccessKey>
      <SessionToken>{}</SessionToken>
      <Expiration>{expiration}</Expiration>
    </Credentials>
  </AssumeRoleResult>
  <ResponseMetadata>
    <RequestId>{}</RequestId>
  </ResponseMetadata>
</AssumeRoleResponse>"#,
        random_letters(40, true),
        random_letters(64, true),
        request_id(),
    );
    Response::builder()
        .status(StatusCode::OK)
        .content_type("text/xml")
        .header("x-amzn-RequestId", request_id())
        .body(xml)
}

fn sts_error(status: StatusCode, code: &str, message: &str) -> Response {
    let sender = if status.is_client_error() {
        "Sender"
    } else {
        "Receiver"
    };
    Response::builder()
        .status(status)
        .content_type("text/xml")
        .body(format!(
            r#"<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>{sender}</Type><Code>{code}</Code><Message>{message}</Message></Error><RequestId>{}</RequestId></ErrorResponse>"#,
            request_id()
        ))
}

/// `application/x-www-form-urlencoded` text.
fn form_decode(s: &str) -> String {
    percent_decode(&s.replace('+', " "))
}

// ---------------------------------------------------------------------------
// Connections that can be killed from inside a response body
// ---------------------------------------------------------------------------

/// Wraps poem's TCP acceptor so that every connection gets a kill switch,
/// registered under the client's address (which the handler sees as
/// `Request::remote_addr`).
struct KillableAcceptor {
    inner: TcpAcceptor,
    state: Shared,
}

impl Acceptor for KillableAcceptor {
    type Io = KillableIo;

    fn local_addr(&self) -> Vec<LocalAddr> {
        self.inner.local_addr()
    }

    async fn accept(&mut self) -> std::io::Result<(KillableIo, LocalAddr, RemoteAddr, Scheme)> {
        let (io, local, remote, scheme) = self.inner.accept().await?;
        let killed = Arc::new(AtomicBool::new(false));
        let key = remote.0.as_socket_addr().copied();
        if let Some(key) = key {
            lock(&self.state).connections.insert(key, killed.clone());
        }
        let io = KillableIo {
            inner: io,
            killed,
            key,
            state: self.state.clone(),
        };
        Ok((io, local, remote, scheme))
    }
}

/// A TCP stream whose every read and write fails once it has been killed;
/// hyper then gives up on the connection without writing anything more.
struct KillableIo {
    inner: tokio::net::TcpStream,
    killed: Arc<AtomicBool>,
    key: Option<SocketAddr>,
    state: Shared,
}

impl KillableIo {
    fn check(&self) -> std::io::Result<()> {
        if self.killed.load(Ordering::SeqCst) {
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "emulator: connection killed",
            ))
        } else {
            Ok(())
        }
    }
}

impl Drop for KillableIo {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            let mut st = lock(&self.state);
            if st
                .connections
                .get(&key)
                .is_some_and(|k| Arc::ptr_eq(k, &self.killed))
            {
                st.connections.remove(&key);
            }
        }
    }
}

impl AsyncRead for KillableIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.check()?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.check()?;
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

// ---------------------------------------------------------------------------
// Randomness (no rand crate among the test dependencies)
// ---------------------------------------------------------------------------

fn random_u64() -> u64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    let mut seed = STATE.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
    if seed == 0 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        STATE.store(now | 1, Ordering::Relaxed);
        seed = now;
    }
    // splitmix64
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn random_letters(len: usize, digits: bool) -> String {
    const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let range = if digits { LETTERS.len() } else { 52 };
    (0..len)
        .map(|_| LETTERS[(random_u64() % range as u64) as usize] as char)
        .collect()
}
