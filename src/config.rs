//! The model registry file (TOML): deserialized once into typed structs and validated at
//! start-up, with errors that name the file, the line and the field.

use std::{
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use toml::Spanned;

use crate::{provider::bedrock::Format, request::Limits};

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
    pub models: Vec<ModelSpec>,
}

#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub name: String,
    pub limits: Limits,
    pub provider: ProviderSpec,
}

#[derive(Debug, Clone)]
pub enum ProviderSpec {
    Bedrock(BedrockSpec),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BedrockSpec {
    /// A model id, inference profile id or ARN.
    pub model_id: String,
    pub format: Format,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
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
    models: Vec<Spanned<RawModel>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum ProviderKind {
    Bedrock,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: Spanned<String>,
    provider: ProviderKind,
    model_id: Option<Spanned<String>>,
    format: Option<Format>,
    region: Option<String>,
    endpoint_url: Option<Spanned<String>>,
    max_tokens: Option<Spanned<u32>>,
    max_tokens_limit: Option<Spanned<u32>>,
    temperature: Option<Spanned<f64>>,
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
        let raw: RawConfig = toml::from_str(text).map_err(|err| {
            let field = err.span().and_then(|span| key_at(text, span.start));
            let message = match field {
                Some(field) => format!("`{field}`: {}", err.message()),
                None => err.message().to_owned(),
            };
            at(err.span(), message)
        })?;

        let mut first_line_of: HashMap<String, usize> = HashMap::new();
        let mut models = Vec::with_capacity(raw.models.len());
        for entry in raw.models {
            let entry_span = entry.span();
            let raw = entry.into_inner();
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
            let model_id = match &raw.model_id {
                Some(id) if !id.get_ref().trim().is_empty() => id.get_ref().trim().to_owned(),
                Some(id) => return Err(at(Some(id.span()), field("`model_id` is empty"))),
                None => {
                    return Err(at(
                        Some(entry_span),
                        field("`model_id` is required for provider \"bedrock\""),
                    ));
                }
            };
            let format = match raw.format.or_else(|| Format::infer(&model_id)) {
                Some(format) => format,
                None => {
                    return Err(at(
                        Some(entry_span),
                        field(
                            "`format` is required (\"llama3\" or \"anthropic\"): it cannot be inferred from this model_id",
                        ),
                    ));
                }
            };
            if let Some(url) = &raw.endpoint_url
                && !(url.get_ref().starts_with("http://") || url.get_ref().starts_with("https://"))
            {
                return Err(at(
                    Some(url.span()),
                    field("`endpoint_url` must start with http:// or https://"),
                ));
            }
            let max_tokens_limit = match &raw.max_tokens_limit {
                Some(limit) if *limit.get_ref() == 0 => {
                    return Err(at(
                        Some(limit.span()),
                        field("`max_tokens_limit` must be at least 1"),
                    ));
                }
                Some(limit) => *limit.get_ref(),
                None => format.max_tokens_limit(),
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
                None => format.default_max_tokens().min(max_tokens_limit),
            };
            if let Some(temperature) = &raw.temperature
                && !(0.0..=1.0).contains(temperature.get_ref())
            {
                return Err(at(
                    Some(temperature.span()),
                    field("`temperature` must be between 0 and 1"),
                ));
            }
            let ProviderKind::Bedrock = raw.provider;
            models.push(ModelSpec {
                name,
                limits: Limits {
                    default_max_tokens,
                    max_tokens_limit,
                    default_temperature: raw.temperature.map(Spanned::into_inner),
                },
                provider: ProviderSpec::Bedrock(BedrockSpec {
                    model_id,
                    format,
                    region: raw.region.filter(|region| !region.is_empty()),
                    endpoint_url: raw.endpoint_url.map(Spanned::into_inner),
                }),
            });
        }
        if models.is_empty() {
            return Err(at(
                None,
                "no models configured: add at least one [[models]] entry".into(),
            ));
        }
        Ok(Config {
            source: source.to_owned(),
            listen: raw.listen,
            allowed_origins: raw.allowed_origins,
            models,
        })
    }
}

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

    fn error_of(text: &str) -> ConfigError {
        Config::parse(text, "test.toml").unwrap_err()
    }

    #[test]
    fn the_bundled_configuration_is_valid() {
        let config = Config::parse(BUNDLED, "bundled").unwrap();
        let names: Vec<_> = config.models.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["llama3", "anthropic"]);
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
    fn the_format_is_inferred_from_well_known_model_ids() {
        let config = Config::parse(
            "[[models]]\nname = \"a\"\nprovider = \"bedrock\"\nmodel_id = \"us.anthropic.claude-3-haiku-20240307-v1:0\"\n",
            "t",
        )
        .unwrap();
        let ProviderSpec::Bedrock(spec) = &config.models[0].provider;
        assert_eq!(spec.format, Format::Anthropic);
        assert_eq!(config.models[0].limits.max_tokens_limit, 4096);
    }
}
