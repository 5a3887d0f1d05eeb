//! A Bedrock model's entry in the configuration: its fields, defaults and validation.

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Map, Value};
use toml::Spanned;

use super::{BedrockProvider, Format};
use crate::{
    content::Accepts,
    provider::{DefaultLimits, Invalid, Provider, ProviderSpec, Shared, UpstreamSettings},
};

/// `provider = "bedrock"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BedrockConfig {
    /// A model id, inference profile id or ARN.
    model_id: Spanned<String>,
    /// Inferred from the model id when left out (see [`Format::infer`]).
    format: Option<Spanned<Format>>,
    region: Option<Spanned<String>>,
    endpoint_url: Option<Spanned<String>>,
    // Credentials of another account (every format).
    role_arn: Option<Spanned<String>>,
    external_id: Option<Spanned<String>>,
    session_name: Option<Spanned<String>>,
    // Converse only.
    guardrail: Option<Spanned<Guardrail>>,
    additional_fields: Option<Spanned<Map<String, Value>>>,
    allow_request_additional_fields: Option<Spanned<bool>>,
    cache_prompt: Option<Spanned<bool>>,
}

/// A Bedrock guardrail applied to every call of the model (`guardrail = { id, version, trace }`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Guardrail {
    /// The guardrail's id or ARN.
    pub id: String,
    /// A version number, or `DRAFT`.
    pub version: String,
    #[serde(default)]
    pub trace: GuardrailTrace,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuardrailTrace {
    #[default]
    Disabled,
    Enabled,
    EnabledFull,
}

impl GuardrailTrace {
    pub fn as_str(self) -> &'static str {
        match self {
            GuardrailTrace::Disabled => "disabled",
            GuardrailTrace::Enabled => "enabled",
            GuardrailTrace::EnabledFull => "enabled_full",
        }
    }
}

/// The role a model's calls assume (STS AssumeRole), with what identifies the session.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Role {
    pub arn: String,
    pub external_id: Option<String>,
    pub session_name: Option<String>,
}

/// A Bedrock model, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct BedrockSpec {
    /// A model id, inference profile id or ARN.
    pub model_id: String,
    pub format: Format,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    pub role: Option<Role>,
    pub converse: ConverseSettings,
}

/// What only `format = "converse"` takes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConverseSettings {
    pub guardrail: Option<Guardrail>,
    /// Passed as `additionalModelRequestFields`.
    pub additional_fields: Map<String, Value>,
    /// Requests may add their own `additional_fields`, merged over the model's.
    pub allow_request_additional_fields: bool,
    /// A cache point after the system prompt and after the tools.
    pub cache_prompt: bool,
}

impl BedrockConfig {
    pub fn validate(self) -> Result<BedrockSpec, Invalid> {
        let model_id = self.model_id.get_ref().trim().to_owned();
        if model_id.is_empty() {
            return Err(Invalid::at(self.model_id.span(), "`model_id` is empty"));
        }
        let format = self
            .format
            .map(Spanned::into_inner)
            .unwrap_or_else(|| Format::infer(&model_id));
        if let Some(url) = &self.endpoint_url
            && !(url.get_ref().starts_with("http://") || url.get_ref().starts_with("https://"))
        {
            return Err(Invalid::at(
                url.span(),
                "`endpoint_url` must start with http:// or https://",
            ));
        }
        let role = validate_role(self.role_arn, self.external_id, self.session_name)?;
        if format != Format::Converse {
            let converse_only = [
                ("guardrail", self.guardrail.as_ref().map(Spanned::span)),
                (
                    "additional_fields",
                    self.additional_fields.as_ref().map(Spanned::span),
                ),
                (
                    "allow_request_additional_fields",
                    self.allow_request_additional_fields
                        .as_ref()
                        .map(Spanned::span),
                ),
                (
                    "cache_prompt",
                    self.cache_prompt.as_ref().map(Spanned::span),
                ),
            ];
            if let Some((field, Some(span))) =
                converse_only.into_iter().find(|(_, span)| span.is_some())
            {
                return Err(Invalid::at(
                    span,
                    format!(
                        "`{field}` needs `format = \"converse\"`; this model's format is `{}`",
                        format.as_str()
                    ),
                ));
            }
        }
        if let Some(guardrail) = &self.guardrail {
            let Guardrail { id, version, .. } = guardrail.get_ref();
            if id.trim().is_empty() || version.trim().is_empty() {
                return Err(Invalid::at(
                    guardrail.span(),
                    "`guardrail` needs a non-empty `id` and `version` (a number or \"DRAFT\")",
                ));
            }
        }
        Ok(BedrockSpec {
            model_id,
            format,
            region: self
                .region
                .map(Spanned::into_inner)
                .filter(|region| !region.is_empty()),
            endpoint_url: self.endpoint_url.map(Spanned::into_inner),
            role,
            converse: ConverseSettings {
                guardrail: self.guardrail.map(Spanned::into_inner),
                additional_fields: self
                    .additional_fields
                    .map(Spanned::into_inner)
                    .unwrap_or_default(),
                allow_request_additional_fields: self
                    .allow_request_additional_fields
                    .is_some_and(Spanned::into_inner),
                cache_prompt: self.cache_prompt.is_some_and(Spanned::into_inner),
            },
        })
    }
}

/// `role_arn` with its optional `external_id` and `session_name`, as STS takes them.
fn validate_role(
    arn: Option<Spanned<String>>,
    external_id: Option<Spanned<String>>,
    session_name: Option<Spanned<String>>,
) -> Result<Option<Role>, Invalid> {
    let Some(arn) = arn else {
        if let Some((field, span)) = [
            ("external_id", &external_id),
            ("session_name", &session_name),
        ]
        .into_iter()
        .find_map(|(field, value)| value.as_ref().map(|value| (field, value.span())))
        {
            return Err(Invalid::at(span, format!("`{field}` needs `role_arn`")));
        }
        return Ok(None);
    };
    if !(arn.get_ref().starts_with("arn:") && arn.get_ref().contains(":role/")) {
        return Err(Invalid::at(
            arn.span(),
            "`role_arn` must be an IAM role ARN (arn:aws:iam::<account>:role/<name>)",
        ));
    }
    if let Some(id) = &external_id
        && !(2..=1224).contains(&id.get_ref().len())
    {
        return Err(Invalid::at(
            id.span(),
            "`external_id` must be 2 to 1224 characters",
        ));
    }
    if let Some(name) = &session_name {
        let valid = (2..=64).contains(&name.get_ref().len())
            && name
                .get_ref()
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c));
        if !valid {
            return Err(Invalid::at(
                name.span(),
                "`session_name` must be 2 to 64 letters, digits or `_+=,.@-`",
            ));
        }
    }
    Ok(Some(Role {
        arn: arn.into_inner(),
        external_id: external_id.map(Spanned::into_inner),
        session_name: session_name.map(Spanned::into_inner),
    }))
}

#[async_trait]
impl ProviderSpec for BedrockSpec {
    fn kind(&self) -> &'static str {
        "bedrock"
    }

    fn model_id(&self) -> String {
        self.model_id.clone()
    }

    fn format(&self) -> &'static str {
        self.format.as_str()
    }

    fn default_limits(&self) -> DefaultLimits {
        DefaultLimits {
            default_max_tokens: self.format.default_max_tokens(),
            max_tokens_limit: self.format.max_tokens_limit(),
        }
    }

    /// Converse takes every block type; the native bodies take text.
    fn accepts(&self) -> Accepts {
        match self.format {
            Format::Converse => Accepts {
                images: true,
                documents: true,
                tools: true,
                reasoning: true,
                additional_fields: self.converse.allow_request_additional_fields,
            },
            Format::Llama3 | Format::Anthropic => Accepts::TEXT,
        }
    }

    async fn build(
        &self,
        name: &str,
        upstream: &UpstreamSettings,
        shared: &mut Shared,
    ) -> Arc<dyn Provider> {
        let clients = &mut shared.bedrock_clients;
        Arc::new(BedrockProvider::new(
            name.to_owned(),
            self.clone(),
            clients.client(self, upstream).await,
            clients.credentials(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(toml: &str) -> Result<BedrockSpec, String> {
        toml::from_str::<BedrockConfig>(toml)
            .map_err(|err| err.to_string())?
            .validate()
            .map_err(|invalid| invalid.message)
    }

    #[test]
    fn converse_fields_are_read_and_refused_on_native_formats_naming_the_field() {
        let spec = validate(
            r#"model_id = "us.anthropic.claude-3-7-sonnet-20250219-v1:0"
guardrail = { id = "gr-1", version = "DRAFT" }
additional_fields = { top_k = 50, thinking = { type = "enabled", budget_tokens = 2048 } }
allow_request_additional_fields = true
cache_prompt = true"#,
        )
        .unwrap();
        assert_eq!(spec.format, Format::Converse);
        assert_eq!(
            spec.converse.guardrail.as_ref().map(|g| g.trace),
            Some(GuardrailTrace::Disabled)
        );
        assert_eq!(
            Value::Object(spec.converse.additional_fields.clone()),
            serde_json::json!({"top_k": 50, "thinking": {"type": "enabled", "budget_tokens": 2048}})
        );
        assert!(spec.accepts().additional_fields && spec.accepts().images);
        let native = |field: &str| {
            validate(&format!(
                "model_id = \"meta.llama3-70b-instruct-v1:0\"\n{field}"
            ))
            .unwrap_err()
        };
        assert_eq!(
            native("cache_prompt = true"),
            "`cache_prompt` needs `format = \"converse\"`; this model's format is `llama3`"
        );
        assert!(native("guardrail = { id = \"g\", version = \"1\" }").starts_with("`guardrail`"));
        assert!(native("additional_fields = { top_k = 1 }").starts_with("`additional_fields`"));
        assert!(
            validate("model_id = \"m\"\nguardrail = { id = \"g\", version = \"\" }")
                .unwrap_err()
                .contains("`guardrail` needs a non-empty `id` and `version`")
        );
        assert!(
            validate(
                "model_id = \"m\"\nguardrail = { id = \"g\", version = \"1\", trace = \"loud\" }"
            )
            .unwrap_err()
            .contains("unknown variant `loud`")
        );
    }

    #[test]
    fn a_role_needs_an_iam_role_arn_and_its_session_fields_need_the_role() {
        let spec = validate(
            "model_id = \"meta.llama3-70b-instruct-v1:0\"\nrole_arn = \"arn:aws:iam::123456789012:role/caller\"\nexternal_id = \"xid-1\"\nsession_name = \"gw\"",
        )
        .unwrap();
        assert_eq!(
            spec.role,
            Some(Role {
                arn: "arn:aws:iam::123456789012:role/caller".into(),
                external_id: Some("xid-1".into()),
                session_name: Some("gw".into()),
            })
        );
        assert_eq!(
            validate("model_id = \"m\"\nexternal_id = \"xid-1\"").unwrap_err(),
            "`external_id` needs `role_arn`"
        );
        assert!(
            validate("model_id = \"m\"\nrole_arn = \"caller\"")
                .unwrap_err()
                .starts_with("`role_arn` must be an IAM role ARN")
        );
        assert!(
            validate(
                "model_id = \"m\"\nrole_arn = \"arn:aws:iam::1:role/r\"\nsession_name = \"a b\""
            )
            .unwrap_err()
            .starts_with("`session_name` must be")
        );
    }
}
