//! The model registry file (TOML): deserialized once into typed structs and validated at
//! start-up, with errors that name the file, the line and the field.

use std::{
    cell::Cell,
    collections::HashMap,
    fmt,
    num::{NonZeroU32, NonZeroU64, NonZeroUsize},
    ops::Range,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, de::IgnoredAny};
use sha2::{Digest, Sha256};
use toml::Spanned;

mod models;

use self::models::read_models;
use crate::{
    content::MediaLimits,
    provider::{ProviderSpec, UpstreamSettings},
    request::Limits,
};

/// The configuration bundled into the binary, used when no file is named and there is no
/// `modelgate.toml` in the working directory.
pub const BUNDLED: &str = include_str!("../modelgate.toml");
const DEFAULT_FILE: &str = "modelgate.toml";

#[derive(Debug, Clone)]
pub struct Config {
    /// Where the file came from, for messages.
    pub source: String,
    pub listen: Option<String>,
    /// Browser origins allowed besides the gateway's own (CORS and WebSocket handshakes).
    pub allowed_origins: Vec<String>,
    /// The origins under which browsers reach the gateway besides its listen address
    /// (`https://gw.example.com` behind a proxy): its own pages, and the only hosts a
    /// browser request may name.
    pub public_origins: Vec<String>,
    pub server: ServerSettings,
    pub connections: ConnectionSettings,
    /// Keys clients must present; none means the gateway is open (on loopback only).
    pub api_keys: Vec<ApiKeySpec>,
    /// The limits of keys that name none of their own (all of `MODELGATE_API_KEYS`).
    pub api_key_limits: KeyLimits,
    pub models: Vec<ModelSpec>,
    pub resume: ResumeSettings,
    /// `[cluster]`: the Redis that replicas share their keys' limits through.
    pub cluster: ClusterSettings,
}

/// Resumable streams: how long a stream without a client goes on, and the bytes of events
/// held for clients that come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumeSettings {
    /// How long a stream goes on with no client, and how long its events are held after it
    /// ended; zero turns resumption off (a client leaving stops the upstream at once).
    pub window: Duration,
    /// Bytes of events held per stream; the oldest are dropped beyond it.
    pub max_bytes_per_stream: usize,
    /// Bytes of events held for all streams of this process together.
    pub max_bytes_total: usize,
}

impl ResumeSettings {
    /// A long answer (4,096 tokens, one event each) takes about 400 KB.
    const MAX_BYTES_PER_STREAM: usize = 1024 * 1024;
    /// A thousand long answers.
    const MAX_BYTES_TOTAL: usize = 512 * 1024 * 1024;

    pub fn enabled(&self) -> bool {
        !self.window.is_zero()
    }
}

/// Settings of the server as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// How long streams in flight may go on after SIGTERM/SIGINT.
    pub shutdown_grace: Duration,
    /// How long a client may leave a chunk unread before it is dropped.
    pub slow_client_timeout: Duration,
    /// Interval of SSE comment lines while the model is silent.
    pub sse_keep_alive: Duration,
    pub max_body_bytes: usize,
    pub ws_max_message_bytes: usize,
    /// Upstream calls in flight across all models; beyond it requests get 503.
    pub max_concurrent_upstream: usize,
    /// How long a client has, from its request's headers, to send the whole body (408 after).
    pub body_read_timeout: Duration,
    /// WebSocket sessions: budgets of the prompts sent ahead, pings and the idle timeout.
    pub ws: WsSettings,
}

/// WebSocket sessions (`/ws/model`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WsSettings {
    /// Bytes of the prompts one connection may send ahead while an answer streams.
    pub max_queued_bytes: usize,
    /// Bytes of the prompts sent ahead on all connections together.
    pub max_queued_bytes_total: usize,
    /// How often a connection with nothing streaming is pinged.
    pub ping_interval: Duration,
    /// How long a connection with nothing streaming may stay silent (no message, no pong).
    pub idle_timeout: Duration,
}

impl WsSettings {
    /// A chat client sends one prompt and waits; prompts of a few KB fill the queue's 16
    /// places before 64 KiB, and a larger one is taken whenever nothing streams.
    const MAX_QUEUED_BYTES: usize = 64 * 1024;
    /// What 1,024 connections at their own budget hold.
    const MAX_QUEUED_BYTES_TOTAL: usize = 64 * 1024 * 1024;
    const PING_INTERVAL: Duration = Duration::from_secs(30);
    /// Three pings unanswered.
    const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
}

/// Limits on client connections, so that clients without a key cannot hold them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionSettings {
    /// Client connections held at once; `None`: derived from the descriptor limit at start.
    pub max_connections: Option<usize>,
    /// How long a client may take to send a request's head (and a new connection its first).
    pub header_read_timeout: Duration,
    /// How long a connection may wait, idle, for its next request.
    pub keep_alive_timeout: Duration,
    /// Requests in flight on one HTTP/2 connection (`SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub http2_max_concurrent_streams: u32,
}

#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub name: String,
    pub limits: Limits,
    pub upstream: UpstreamSettings,
    /// The provider's own settings, validated (see [`crate::provider::ProviderConfig`]).
    pub provider: Arc<dyn ProviderSpec>,
}

/// An API key, by the SHA-256 of its secret, with its limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeySpec {
    /// A name for logs and metrics (never the secret).
    pub id: String,
    pub sha256: [u8; 32],
    pub limits: KeyLimits,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyLimits {
    pub requests_per_minute: Option<NonZeroU32>,
    pub tokens_per_minute: Option<NonZeroU32>,
    pub concurrent_streams: Option<NonZeroUsize>,
    /// Tokens (input and output) per UTC calendar day and month.
    pub tokens_per_day: Option<NonZeroU64>,
    pub tokens_per_month: Option<NonZeroU64>,
}

/// A configuration error, located in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub source: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}, line {line}: {}", self.source, self.message),
            None => write!(f, "{}: {}", self.source, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    #[serde(default)]
    allowed_origins: Vec<String>,
    #[serde(default)]
    public_origins: Vec<Spanned<String>>,
    body_read_timeout: Option<Spanned<Wait>>,
    shutdown_grace: Option<Spanned<Wait>>,
    slow_client_timeout: Option<Spanned<Wait>>,
    sse_keep_alive: Option<Spanned<Wait>>,
    max_body_bytes: Option<NonZeroUsize>,
    ws_max_message_bytes: Option<NonZeroUsize>,
    max_concurrent_upstream: Option<NonZeroUsize>,
    // WebSocket sessions: see `WsSettings`.
    ws_max_queued_bytes: Option<NonZeroUsize>,
    ws_max_queued_bytes_total: Option<NonZeroUsize>,
    ws_ping_interval: Option<Spanned<Wait>>,
    ws_idle_timeout: Option<Spanned<Wait>>,
    max_messages: Option<NonZeroUsize>,
    max_input_chars: Option<NonZeroUsize>,
    // Media in one request: see `MediaLimits`.
    max_image_bytes: Option<NonZeroUsize>,
    max_images: Option<NonZeroUsize>,
    max_document_bytes: Option<NonZeroUsize>,
    max_documents: Option<NonZeroUsize>,
    // Client connections.
    max_connections: Option<NonZeroUsize>,
    header_read_timeout: Option<Spanned<Wait>>,
    keep_alive_timeout: Option<Spanned<Wait>>,
    http2_max_concurrent_streams: Option<NonZeroU32>,
    // Resumable streams: see `ResumeSettings`.
    resume_window: Option<Spanned<WindowSetting>>,
    resume_max_bytes_per_stream: Option<Spanned<NonZeroUsize>>,
    resume_max_bytes_total: Option<NonZeroUsize>,
    /// Defaults for every model's `upstream` table.
    #[serde(default)]
    upstream: RawUpstream,
    /// Defaults for every API key's `limits` table.
    #[serde(default)]
    api_key_limits: RawKeyLimits,
    #[serde(default)]
    api_keys: Vec<RawApiKey>,
    #[serde(default)]
    cluster: RawCluster,
    /// Read apart, with their providers' fields (see [`read_models`]).
    #[serde(default, rename = "models")]
    _models: Vec<IgnoredAny>,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    connect_timeout: Option<Wait>,
    first_token_timeout: Option<Wait>,
    idle_timeout: Option<Wait>,
    total_timeout: Option<Wait>,
    max_attempts: Option<NonZeroU32>,
    max_concurrent: Option<NonZeroUsize>,
}

impl RawUpstream {
    /// This table's values, else `defaults`' values.
    fn or(self, defaults: RawUpstream) -> RawUpstream {
        RawUpstream {
            connect_timeout: self.connect_timeout.or(defaults.connect_timeout),
            first_token_timeout: self.first_token_timeout.or(defaults.first_token_timeout),
            idle_timeout: self.idle_timeout.or(defaults.idle_timeout),
            total_timeout: self.total_timeout.or(defaults.total_timeout),
            max_attempts: self.max_attempts.or(defaults.max_attempts),
            max_concurrent: self.max_concurrent.or(defaults.max_concurrent),
        }
    }

    fn settings(self) -> UpstreamSettings {
        let wait = |value: Option<Wait>, default_secs| {
            value.map_or(Duration::from_secs(default_secs), |wait| wait.0)
        };
        UpstreamSettings {
            connect_timeout: wait(self.connect_timeout, 10),
            first_token_timeout: wait(self.first_token_timeout, 60),
            idle_timeout: wait(self.idle_timeout, 30),
            total_timeout: wait(self.total_timeout, 600),
            max_attempts: self.max_attempts.map_or(3, NonZeroU32::get),
            max_concurrent: self.max_concurrent.map_or(128, NonZeroUsize::get),
        }
    }
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct RawKeyLimits {
    requests_per_minute: Option<NonZeroU32>,
    tokens_per_minute: Option<NonZeroU32>,
    concurrent_streams: Option<NonZeroUsize>,
    tokens_per_day: Option<NonZeroU64>,
    tokens_per_month: Option<NonZeroU64>,
}

impl RawKeyLimits {
    fn or(self, defaults: RawKeyLimits) -> KeyLimits {
        KeyLimits {
            requests_per_minute: self.requests_per_minute.or(defaults.requests_per_minute),
            tokens_per_minute: self.tokens_per_minute.or(defaults.tokens_per_minute),
            concurrent_streams: self.concurrent_streams.or(defaults.concurrent_streams),
            tokens_per_day: self.tokens_per_day.or(defaults.tokens_per_day),
            tokens_per_month: self.tokens_per_month.or(defaults.tokens_per_month),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApiKey {
    id: Spanned<String>,
    /// Hex SHA-256 of the key's secret: the file never holds the secret itself.
    sha256: Spanned<String>,
    #[serde(default)]
    limits: RawKeyLimits,
}

/// A duration written as `"30s"`, `"500ms"`, `"10m"`; never zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Wait(Duration);

impl<'de> Deserialize<'de> for Wait {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        match humantime::parse_duration(&text) {
            Ok(duration) if !duration.is_zero() => Ok(Wait(duration)),
            Ok(_) => Err(serde::de::Error::custom(
                "a duration must be more than zero",
            )),
            Err(err) => Err(serde::de::Error::custom(format!(
                "`{text}` is not a duration ({err}); write e.g. \"500ms\", \"30s\" or \"10m\""
            ))),
        }
    }
}

/// A duration that may be zero: `"30s"`, `"0"` or `0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct WindowSetting(Duration);

impl<'de> Deserialize<'de> for WindowSetting {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Seconds(u64),
            Text(String),
        }
        match Written::deserialize(deserializer)? {
            Written::Seconds(0) => Ok(WindowSetting(Duration::ZERO)),
            Written::Seconds(_) => Err(serde::de::Error::custom(
                "write the duration with its unit, e.g. \"30s\" (or 0 for off)",
            )),
            Written::Text(text) => humantime::parse_duration(&text).map(WindowSetting).map_err(
                |err| {
                    serde::de::Error::custom(format!(
                        "`{text}` is not a duration ({err}); write e.g. \"30s\", or \"0\" for off"
                    ))
                },
            ),
        }
    }
}

/// The resumption settings, defaults applied; a stream's cap cannot exceed the total.
fn resume_settings(
    window: Option<Spanned<WindowSetting>>,
    max_bytes_per_stream: Option<Spanned<NonZeroUsize>>,
    max_bytes_total: Option<NonZeroUsize>,
    at: &At,
) -> Result<ResumeSettings, ConfigError> {
    let settings = ResumeSettings {
        window: window.map_or(Duration::ZERO, |window| window.into_inner().0),
        max_bytes_per_stream: max_bytes_per_stream
            .as_ref()
            .map_or(ResumeSettings::MAX_BYTES_PER_STREAM, |max| {
                max.get_ref().get()
            }),
        max_bytes_total: max_bytes_total.map_or(ResumeSettings::MAX_BYTES_TOTAL, NonZeroUsize::get),
    };
    if settings.max_bytes_per_stream > settings.max_bytes_total {
        return Err(at(
            max_bytes_per_stream.map(|max| max.span()),
            format!(
                "`resume_max_bytes_per_stream` ({}) must not exceed `resume_max_bytes_total` ({})",
                settings.max_bytes_per_stream, settings.max_bytes_total
            ),
        ));
    }
    Ok(settings)
}

impl Config {
    /// Reads `path`, else `./modelgate.toml`, else the bundled configuration.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let path: Option<PathBuf> = match path {
            Some(path) => Some(path.to_owned()),
            None => Some(PathBuf::from(DEFAULT_FILE)).filter(|default| default.is_file()),
        };
        match path {
            Some(path) => {
                let source = path.display().to_string();
                let text = std::fs::read_to_string(&path).map_err(|err| ConfigError {
                    source: source.clone(),
                    line: None,
                    message: format!("cannot read the configuration file: {err}"),
                })?;
                Config::parse(&text, &source)
            }
            None => Config::parse(BUNDLED, "<bundled modelgate.toml>"),
        }
    }

    pub fn parse(text: &str, source: &str) -> Result<Config, ConfigError> {
        let at = |span: Option<std::ops::Range<usize>>, message: String| ConfigError {
            source: source.to_owned(),
            line: span.map(|span| line_of(text, span.start)),
            message,
        };
        let toml_error = |err: toml::de::Error, span: Option<Range<usize>>| {
            let span = span.or(err.span());
            let field = span.clone().and_then(|span| key_at(text, span.start));
            let message = match field {
                Some(field) => format!("`{field}`: {}", err.message()),
                None => err.message().to_owned(),
            };
            at(span, message)
        };
        let raw: RawConfig = toml::from_str(text).map_err(|err| toml_error(err, None))?;
        let key_span = Cell::new(None);
        let entries =
            read_models(text, &key_span).map_err(|err| toml_error(err, key_span.take()))?;

        let defaults = raw.upstream;
        let max_messages = raw.max_messages.map_or(512, NonZeroUsize::get);
        let max_input_chars = raw.max_input_chars.map_or(500_000, NonZeroUsize::get);
        let media_defaults = MediaLimits::default();
        let media = MediaLimits {
            max_image_bytes: raw
                .max_image_bytes
                .map_or(media_defaults.max_image_bytes, NonZeroUsize::get),
            max_images: raw
                .max_images
                .map_or(media_defaults.max_images, NonZeroUsize::get),
            max_document_bytes: raw
                .max_document_bytes
                .map_or(media_defaults.max_document_bytes, NonZeroUsize::get),
            max_documents: raw
                .max_documents
                .map_or(media_defaults.max_documents, NonZeroUsize::get),
        };
        let mut first_line_of: HashMap<String, usize> = HashMap::new();
        let mut models = Vec::with_capacity(entries.len());
        for raw in entries {
            let name = raw.name.get_ref().trim().to_owned();
            let field = |what: &str| format!("model `{name}`: {what}");
            if name.is_empty() {
                return Err(at(Some(raw.name.span()), "`name` is empty".into()));
            }
            let line = line_of(text, raw.name.span().start);
            if let Some(first) = first_line_of.insert(name.clone(), line) {
                return Err(at(
                    Some(raw.name.span()),
                    format!("duplicate model name `{name}` (first defined on line {first})"),
                ));
            }
            let provider = raw.provider.validate().map_err(|invalid| {
                at(
                    Some(invalid.span.unwrap_or(raw.name.span())),
                    field(&invalid.message),
                )
            })?;
            let default_limits = provider.default_limits();
            let max_tokens_limit = match &raw.max_tokens_limit {
                Some(limit) if *limit.get_ref() == 0 => {
                    return Err(at(
                        Some(limit.span()),
                        field("`max_tokens_limit` must be at least 1"),
                    ));
                }
                Some(limit) => *limit.get_ref(),
                None => default_limits.max_tokens_limit,
            };
            let default_max_tokens = match &raw.max_tokens {
                Some(max) if *max.get_ref() == 0 || *max.get_ref() > max_tokens_limit => {
                    return Err(at(
                        Some(max.span()),
                        field(&format!(
                            "`max_tokens` = {} must be between 1 and `max_tokens_limit` = {max_tokens_limit}",
                            max.get_ref()
                        )),
                    ));
                }
                Some(max) => *max.get_ref(),
                None => default_limits.default_max_tokens.min(max_tokens_limit),
            };
            if let Some(temperature) = &raw.temperature
                && !(0.0..=1.0).contains(temperature.get_ref())
            {
                return Err(at(
                    Some(temperature.span()),
                    field("`temperature` must be between 0 and 1"),
                ));
            }
            models.push(ModelSpec {
                name,
                limits: Limits {
                    default_max_tokens,
                    max_tokens_limit,
                    default_temperature: raw.temperature.map(Spanned::into_inner),
                    max_messages,
                    max_input_chars,
                    special_tokens: raw.special_tokens.unwrap_or_default(),
                    accepts: provider.accepts(),
                    media,
                },
                upstream: raw.upstream.unwrap_or_default().or(defaults).settings(),
                provider,
            });
        }
        if models.is_empty() {
            return Err(at(
                None,
                "no models configured: add at least one [[models]] entry".into(),
            ));
        }
        let mut api_keys: Vec<ApiKeySpec> = Vec::with_capacity(raw.api_keys.len());
        for key in raw.api_keys {
            let id = key.id.get_ref().trim();
            if id.is_empty() {
                return Err(at(Some(key.id.span()), "api key `id` is empty".into()));
            }
            if api_keys.iter().any(|known| known.id == id) {
                return Err(at(
                    Some(key.id.span()),
                    format!("duplicate api key id `{id}`"),
                ));
            }
            let Some(sha256) = parse_sha256(key.sha256.get_ref()) else {
                return Err(at(
                    Some(key.sha256.span()),
                    format!(
                        "api key `{id}`: `sha256` must be 64 hex digits, the SHA-256 of the key (e.g. `printf %s \"$KEY\" | sha256sum`)"
                    ),
                ));
            };
            api_keys.push(ApiKeySpec {
                id: id.to_owned(),
                sha256,
                limits: key.limits.or(raw.api_key_limits),
            });
        }
        let wait = |value: Option<Spanned<Wait>>, default_secs| {
            value.map_or(Duration::from_secs(default_secs), |wait| {
                wait.into_inner().0
            })
        };
        let mut public_origins = Vec::with_capacity(raw.public_origins.len());
        for origin in raw.public_origins {
            if !is_origin(origin.get_ref()) {
                return Err(at(
                    Some(origin.span()),
                    format!(
                        "`public_origins`: `{}` is not an origin; write a scheme and a host, with a port if not the default, and no path (e.g. \"https://gw.example.com\")",
                        origin.get_ref()
                    ),
                ));
            }
            public_origins.push(origin.into_inner());
        }
        let ws = ws_settings(
            raw.ws_max_queued_bytes,
            raw.ws_max_queued_bytes_total,
            raw.ws_ping_interval,
            raw.ws_idle_timeout,
            &at,
        )?;
        let resume = resume_settings(
            raw.resume_window,
            raw.resume_max_bytes_per_stream,
            raw.resume_max_bytes_total,
            &at,
        )?;
        Ok(Config {
            source: source.to_owned(),
            listen: raw.listen,
            allowed_origins: raw.allowed_origins,
            public_origins,
            server: ServerSettings {
                shutdown_grace: wait(raw.shutdown_grace, 30),
                slow_client_timeout: wait(raw.slow_client_timeout, 30),
                sse_keep_alive: wait(raw.sse_keep_alive, 15),
                max_body_bytes: raw
                    .max_body_bytes
                    .map_or(16 * 1024 * 1024, NonZeroUsize::get),
                ws_max_message_bytes: raw
                    .ws_max_message_bytes
                    .map_or(1024 * 1024, NonZeroUsize::get),
                max_concurrent_upstream: raw.max_concurrent_upstream.map_or(512, NonZeroUsize::get),
                body_read_timeout: wait(raw.body_read_timeout, 10),
                ws,
            },
            connections: ConnectionSettings {
                max_connections: raw.max_connections.map(NonZeroUsize::get),
                header_read_timeout: wait(raw.header_read_timeout, 10),
                keep_alive_timeout: wait(raw.keep_alive_timeout, 60),
                http2_max_concurrent_streams: raw
                    .http2_max_concurrent_streams
                    .map_or(128, NonZeroU32::get),
            },
            api_keys,
            api_key_limits: RawKeyLimits::default().or(raw.api_key_limits),
            models,
            resume,
            cluster: raw.cluster.settings(&at)?,
        })
    }

    /// Adds the keys of `MODELGATE_API_KEYS`: comma-separated `id:secret` pairs (or bare
    /// secrets, named `env-1`, `env-2`, …), hashed at once; they get `api_key_limits`.
    pub fn add_env_keys(&mut self, value: &str) -> Result<(), ConfigError> {
        for (index, entry) in value
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .enumerate()
        {
            let (id, secret) = match entry.split_once(':') {
                Some((id, secret)) => (id.trim().to_owned(), secret.trim()),
                None => (format!("env-{}", index + 1), entry),
            };
            if secret.is_empty() || self.api_keys.iter().any(|known| known.id == id) {
                return Err(ConfigError {
                    source: "MODELGATE_API_KEYS".into(),
                    line: None,
                    message: format!(
                        "entry {} (id `{id}`) is empty or its id is already used",
                        index + 1
                    ),
                });
            }
            self.api_keys.push(ApiKeySpec {
                id,
                sha256: Sha256::digest(secret.as_bytes()).into(),
                limits: self.api_key_limits,
            });
        }
        Ok(())
    }
}

// ---- `[cluster]`: replicas sharing their keys' limits through Redis ----

/// `[cluster]`: without `redis_url` every limit is kept in this process alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// `redis://` or `rediss://` (TLS), with a password if any: never logged as written
    /// (see [`ClusterSettings::redacted_url`]).
    pub redis_url: Option<String>,
    /// What a request meets when Redis cannot answer a limit check in time.
    pub on_redis_error: OnRedisError,
    /// How long a limit check may wait for Redis before `on_redis_error` applies.
    pub redis_timeout: Duration,
    /// How long a concurrent-stream lease outlives a replica that stopped renewing it.
    pub lease_ttl: Duration,
    /// Prefix of every Redis key the gateway writes.
    pub key_prefix: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnRedisError {
    /// The request goes on without the shared limits (logged and counted).
    #[default]
    Allow,
    /// The request is refused with 503 `limits_unavailable`.
    Deny,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            redis_url: None,
            on_redis_error: OnRedisError::Allow,
            redis_timeout: Duration::from_millis(250),
            lease_ttl: Duration::from_secs(30),
            key_prefix: "modelgate".into(),
        }
    }
}

impl ClusterSettings {
    /// The URL with its password replaced by `***`, for logs.
    pub fn redacted_url(&self) -> Option<String> {
        self.redis_url.as_deref().map(redact_url)
    }
}

/// `url` with any password replaced by `***` (and nothing at all if it does not parse).
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => "<unparsable URL>".into(),
    }
}

/// Checks a Redis URL without ever echoing it (it may hold a password).
fn check_redis_url(url: &str) -> Result<(), String> {
    use redis::IntoConnectionInfo;
    url.into_connection_info().map(|_| ()).map_err(|err| {
        format!(
            "`redis_url` is not a Redis URL ({}); write e.g. \"redis://:PASSWORD@host:6379/0\", or \"rediss://…\" for TLS",
            err.category()
        )
    })
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    redis_url: Option<Spanned<String>>,
    on_redis_error: Option<OnRedisError>,
    redis_timeout: Option<Wait>,
    lease_ttl: Option<Spanned<Wait>>,
    key_prefix: Option<String>,
}

impl RawCluster {
    fn settings(self, at: &At) -> Result<ClusterSettings, ConfigError> {
        let defaults = ClusterSettings::default();
        if let Some(url) = &self.redis_url {
            check_redis_url(url.get_ref()).map_err(|message| at(Some(url.span()), message))?;
        }
        if let Some(ttl) = &self.lease_ttl
            && ttl.get_ref().0 < Duration::from_secs(1)
        {
            return Err(at(
                Some(ttl.span()),
                "`lease_ttl` must be at least 1s (leases are renewed three times per TTL)".into(),
            ));
        }
        Ok(ClusterSettings {
            redis_url: self.redis_url.map(Spanned::into_inner),
            on_redis_error: self.on_redis_error.unwrap_or_default(),
            redis_timeout: self
                .redis_timeout
                .map_or(defaults.redis_timeout, |wait| wait.0),
            lease_ttl: self
                .lease_ttl
                .map_or(defaults.lease_ttl, |wait| wait.into_inner().0),
            key_prefix: self.key_prefix.unwrap_or(defaults.key_prefix),
        })
    }
}

impl Config {
    /// `MODELGATE_REDIS_URL`, which beats `[cluster] redis_url`.
    pub fn set_redis_url(&mut self, url: &str) -> Result<(), ConfigError> {
        check_redis_url(url).map_err(|message| ConfigError {
            source: "MODELGATE_REDIS_URL".into(),
            line: None,
            message,
        })?;
        self.cluster.redis_url = Some(url.to_owned());
        Ok(())
    }
}

// ---- end of `[cluster]` ----

/// The WebSocket settings, defaults applied; the idle timeout must leave room for a ping.
fn ws_settings(
    max_queued_bytes: Option<NonZeroUsize>,
    max_queued_bytes_total: Option<NonZeroUsize>,
    ping_interval: Option<Spanned<Wait>>,
    idle_timeout: Option<Spanned<Wait>>,
    at: &At,
) -> Result<WsSettings, ConfigError> {
    let ping_interval_value = ping_interval
        .as_ref()
        .map_or(WsSettings::PING_INTERVAL, |wait| wait.get_ref().0);
    let idle_timeout_value = idle_timeout
        .as_ref()
        .map_or(WsSettings::IDLE_TIMEOUT, |wait| wait.get_ref().0);
    if idle_timeout_value <= ping_interval_value {
        let span = idle_timeout.or(ping_interval).map(|wait| wait.span());
        return Err(at(
            span,
            format!(
                "`ws_idle_timeout` ({idle_timeout_value:?}) must be longer than `ws_ping_interval` ({ping_interval_value:?})"
            ),
        ));
    }
    Ok(WsSettings {
        max_queued_bytes: max_queued_bytes.map_or(WsSettings::MAX_QUEUED_BYTES, NonZeroUsize::get),
        max_queued_bytes_total: max_queued_bytes_total
            .map_or(WsSettings::MAX_QUEUED_BYTES_TOTAL, NonZeroUsize::get),
        ping_interval: ping_interval_value,
        idle_timeout: idle_timeout_value,
    })
}

/// Whether `text` is a web origin as browsers write it: `http(s)://host[:port]`, no path.
fn is_origin(text: &str) -> bool {
    let Some((scheme, authority)) = text.split_once("://") else {
        return false;
    };
    matches!(scheme, "http" | "https")
        && authority.parse::<poem::http::uri::Authority>().is_ok()
        && !authority.contains(['/', '@', '?', '#'])
}

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut bytes = [0u8; 32];
    for (byte, pair) in bytes.iter_mut().zip(hex.as_bytes().chunks(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(bytes)
}

type At<'a> = dyn Fn(Option<Range<usize>>, String) -> ConfigError + 'a;

/// The key of a `key = value` line holding the byte offset, so that a type error on the
/// value can name its field.
fn key_at(text: &str, offset: usize) -> Option<&str> {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map_or(0, |at| at + 1);
    let line = text[start..].lines().next()?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    (!key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')).then_some(key)
}

/// 1-based line number of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::special_tokens::SpecialTokenPolicy;

    fn error_of(text: &str) -> ConfigError {
        Config::parse(text, "test.toml").unwrap_err()
    }

    #[test]
    fn the_bundled_configuration_is_valid() {
        let config = Config::parse(BUNDLED, "bundled").unwrap();
        let names: Vec<_> = config.models.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["local", "llama3", "anthropic", "claude"]);
    }

    #[test]
    fn bad_toml_names_the_line() {
        let err = error_of("listen = \"x\"\n[[models]\nname = 1\n");
        assert_eq!(err.line, Some(2), "{err}");
    }

    #[test]
    fn an_unknown_provider_names_the_line_and_the_choices() {
        let err = error_of("[[models]]\nname = \"a\"\nprovider = \"openai\"\n");
        assert_eq!(err.line, Some(3), "{err}");
        assert!(err.message.starts_with("`provider`: "), "{err}");
        assert!(err.message.contains("bedrock"), "{err}");
    }

    #[test]
    fn an_unknown_format_is_refused() {
        let err = error_of(
            "[[models]]\nname = \"a\"\nprovider = \"bedrock\"\nmodel_id = \"x\"\nformat = \"gpt\"\n",
        );
        assert_eq!(err.line, Some(5), "{err}");
        assert!(err.message.contains("llama3"), "{err}");
    }

    #[test]
    fn a_duplicate_name_points_at_both_definitions() {
        let model = "[[models]]\nname = \"a\"\nprovider = \"bedrock\"\nmodel_id = \"meta.llama3-8b-instruct-v1:0\"\n";
        let err = error_of(&format!("{model}{model}"));
        assert_eq!(err.line, Some(6), "{err}");
        assert!(err.message.contains("first defined on line 2"), "{err}");
    }

    #[test]
    fn empty_model_id_and_max_tokens_over_the_limit_are_refused() {
        let err = error_of("[[models]]\nname = \"a\"\nprovider = \"bedrock\"\nmodel_id = \"\"\n");
        assert!(err.message.contains("`model_id` is empty"), "{err}");
        let err = error_of(
            "[[models]]\nname = \"a\"\nprovider = \"bedrock\"\nmodel_id = \"anthropic.claude-3-haiku-20240307-v1:0\"\nmax_tokens = 900\nmax_tokens_limit = 800\n",
        );
        assert_eq!(err.line, Some(5), "{err}");
        assert!(
            err.to_string().starts_with("test.toml, line 5: model `a`"),
            "{err}"
        );
    }

    #[test]
    fn ws_idle_timeout_must_be_longer_than_the_ping_interval() {
        let model = "[[models]]\nname = \"a\"\nprovider = \"bedrock\"\nmodel_id = \"meta.llama3-8b-instruct-v1:0\"\n";
        let err = error_of(&format!(
            "ws_ping_interval = \"30s\"\nws_idle_timeout = \"30s\"\n{model}"
        ));
        assert_eq!(err.line, Some(2), "{err}");
        assert!(err.message.contains("`ws_idle_timeout`"), "{err}");
        let config = Config::parse(&format!("ws_idle_timeout = \"5m\"\n{model}"), "t").unwrap();
        assert_eq!(config.server.ws.idle_timeout, Duration::from_secs(300));
        assert_eq!(config.server.ws.ping_interval, Duration::from_secs(30));
        assert_eq!(config.server.ws.max_queued_bytes, 64 * 1024);
    }

    #[test]
    fn public_origins_must_be_origins_and_body_read_timeout_defaults_to_10s() {
        let model = "[[models]]\nname = \"a\"\nprovider = \"bedrock\"\nmodel_id = \"meta.llama3-8b-instruct-v1:0\"\n";
        let err = error_of(&format!(
            "public_origins = [\"https://gw.example.com/chat\"]\n{model}"
        ));
        assert_eq!(err.line, Some(1), "{err}");
        assert!(err.message.contains("public_origins"), "{err}");
        let config = Config::parse(
            &format!("public_origins = [\"https://gw.example.com\"]\n{model}"),
            "t",
        )
        .unwrap();
        assert_eq!(config.public_origins, ["https://gw.example.com"]);
        assert_eq!(config.server.body_read_timeout, Duration::from_secs(10));
    }

    #[test]
    fn resume_window_is_off_by_default_and_its_caps_are_checked() {
        let model = "[[models]]\nname = \"a\"\nprovider = \"bedrock\"\nmodel_id = \"meta.llama3-8b-instruct-v1:0\"\n";
        let resume = |extra: &str| Config::parse(&format!("{extra}{model}"), "t").map(|c| c.resume);
        assert!(!resume("").unwrap().enabled());
        assert!(!resume("resume_window = 0\n").unwrap().enabled());
        assert!(!resume("resume_window = \"0s\"\n").unwrap().enabled());
        assert_eq!(
            resume("resume_window = \"30s\"\n").unwrap().window,
            Duration::from_secs(30)
        );
        let err = resume("resume_window = \"soon\"\n").unwrap_err();
        assert!(err.message.starts_with("`resume_window`: "), "{err}");
        let err = resume("resume_max_bytes_total = 1000\nresume_max_bytes_per_stream = 2000\n")
            .unwrap_err();
        assert_eq!(err.line, Some(2), "{err}");
        assert!(
            err.message.contains("`resume_max_bytes_per_stream`"),
            "{err}"
        );
    }

    #[test]
    fn the_format_is_inferred_from_well_known_model_ids() {
        let config = Config::parse(
            "[[models]]\nname = \"a\"\nprovider = \"bedrock\"\nmodel_id = \"us.anthropic.claude-3-haiku-20240307-v1:0\"\n",
            "t",
        )
        .unwrap();
        assert_eq!(config.models[0].provider.format(), "anthropic");
        assert_eq!(config.models[0].limits.max_tokens_limit, 4096);
    }

    #[test]
    fn special_tokens_is_refuse_by_default_or_escape_and_nothing_else() {
        let model = "[[models]]\nname = \"a\"\nprovider = \"bedrock\"\nmodel_id = \"meta.llama3-8b-instruct-v1:0\"\n";
        let policy = |extra: &str| {
            Config::parse(&format!("{model}{extra}"), "t")
                .map(|config| config.models[0].limits.special_tokens)
        };
        assert_eq!(policy("").unwrap(), SpecialTokenPolicy::Refuse);
        assert_eq!(
            policy("special_tokens = \"escape\"\n").unwrap(),
            SpecialTokenPolicy::Escape
        );
        let err = policy("special_tokens = \"strip\"\n").unwrap_err();
        assert_eq!(err.line, Some(5), "{err}");
        assert!(err.message.starts_with("`special_tokens`: "), "{err}");
        assert!(err.message.contains("escape"), "{err}");
    }

    #[test]
    fn a_field_of_another_provider_is_refused_on_its_line_naming_the_choices() {
        let model = "[[models]]\nname = \"a\"\nprovider = \"bedrock\"\nmodel_id = \"meta.llama3-8b-instruct-v1:0\"\n";
        let err = error_of(&format!("{model}package = \"x==1\"\n"));
        assert_eq!(err.line, Some(5), "{err}");
        assert!(
            err.message
                .starts_with("`package`: unknown field `package`, expected one of `model_id`"),
            "{err}"
        );
        assert!(
            err.message.ends_with(
                "`cache_prompt` for provider \"bedrock\", or one of `name`, `provider`, `max_tokens`, `max_tokens_limit`, `temperature`, `special_tokens`, `upstream`"
            ),
            "{err}"
        );
        let err = error_of(
            "[[models]]\nname = \"a\"\nprovider = \"local\"\npath = \"/m.gguf\"\nregion = \"x\"\n",
        );
        assert_eq!(err.line, Some(5), "{err}");
        assert!(err.message.contains("unknown field `region`"), "{err}");
    }

    #[test]
    fn a_provider_field_is_read_in_any_order_and_the_common_ones_keep_their_lines() {
        let config = Config::parse(
            "[[models]]\nmodel_id = \"meta.llama3-8b-instruct-v1:0\"\nmax_tokens = 7\nname = \"a\"\nprovider = \"bedrock\"\n[models.upstream]\nmax_attempts = 1\n",
            "t",
        )
        .unwrap();
        assert_eq!(config.models[0].limits.default_max_tokens, 7);
        assert_eq!(config.models[0].upstream.max_attempts, 1);
        assert_eq!(
            config.models[0].provider.model_id(),
            "meta.llama3-8b-instruct-v1:0"
        );
        let err = error_of("[[models]]\nname = \"a\"\nprovider = \"bedrock\"\n");
        assert_eq!(err.line, Some(1), "{err}");
        assert!(err.message.contains("missing field `model_id`"), "{err}");
        let err = error_of(
            "[[models]]\nprovider = \"bedrock\"\nname = \"a\"\nmodel_id = \"meta.llama3-8b-instruct-v1:0\"\ncache_prompt = true\n",
        );
        assert_eq!(err.line, Some(5), "{err}");
        assert!(
            err.message
                .contains("`cache_prompt` needs `format = \"converse\"`"),
            "{err}"
        );
        let err = error_of(
            "[[models]]\nname = \"a\"\nprovider = \"local\"\npath = \"/m.gguf\"\nworkers = 0\n",
        );
        assert_eq!(err.line, Some(5), "{err}");
        assert!(
            err.message.contains("`workers` must be at least 1"),
            "{err}"
        );
    }

    #[test]
    fn cluster_reads_redis_url_and_on_redis_error_and_never_echoes_a_bad_url() {
        let model = "[[models]]\nname = \"a\"\nprovider = \"bedrock\"\nmodel_id = \"meta.llama3-8b-instruct-v1:0\"\n";
        let config = Config::parse(model, "t").unwrap();
        assert_eq!(config.cluster, ClusterSettings::default());
        let config = Config::parse(
            &format!("{model}[cluster]\nredis_url = \"rediss://:s3cret@redis.internal:6380/2\"\non_redis_error = \"deny\"\nredis_timeout = \"100ms\"\n"),
            "t",
        )
        .unwrap();
        assert_eq!(config.cluster.on_redis_error, OnRedisError::Deny);
        assert_eq!(config.cluster.redis_timeout, Duration::from_millis(100));
        assert_eq!(
            config.cluster.redacted_url().unwrap(),
            "rediss://:***@redis.internal:6380/2"
        );
        let err = error_of(&format!(
            "{model}[cluster]\nredis_url = \"http://user:s3cret@redis\"\n"
        ));
        assert_eq!(err.line, Some(6), "{err}");
        assert!(err.message.contains("`redis_url`"), "{err}");
        assert!(!err.to_string().contains("s3cret"), "{err}");
        let err = error_of(&format!("{model}[cluster]\non_redis_error = \"maybe\"\n"));
        assert!(err.message.contains("allow"), "{err}");
        let err = error_of(&format!("{model}[cluster]\nlease_ttl = \"10ms\"\n"));
        assert_eq!(err.line, Some(6), "{err}");
        assert!(err.message.contains("`lease_ttl`"), "{err}");
    }

    #[test]
    fn the_redis_url_of_the_environment_beats_the_file() {
        let model = "[[models]]\nname = \"a\"\nprovider = \"bedrock\"\nmodel_id = \"meta.llama3-8b-instruct-v1:0\"\n[cluster]\nredis_url = \"redis://file:6379\"\n";
        let mut config = Config::parse(model, "t").unwrap();
        config.set_redis_url("redis://env:6379").unwrap();
        assert_eq!(
            config.cluster.redis_url.as_deref(),
            Some("redis://env:6379")
        );
        let err = config.set_redis_url("nonsense://x:p4ss@h").unwrap_err();
        assert!(
            err.to_string().starts_with("MODELGATE_REDIS_URL: "),
            "{err}"
        );
        assert!(!err.to_string().contains("p4ss"), "{err}");
    }
}
