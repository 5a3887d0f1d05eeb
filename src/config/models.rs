//! The `[[models]]` entries: read key by key, so that each field keeps its span. The fields
//! every model has are taken here; the others go to the [`ProviderConfig`] arm that the
//! entry's `provider` names, a struct with `deny_unknown_fields` in the provider's module.

use std::{cell::Cell, fmt, ops::Range};

use serde::{
    Deserialize,
    de::{
        DeserializeSeed, EnumAccess, Error as _, IgnoredAny, IntoDeserializer, MapAccess,
        SeqAccess, VariantAccess, Visitor, value::EnumAccessDeserializer,
    },
};
use toml::Spanned;

use super::RawUpstream;
use crate::{provider::ProviderConfig, special_tokens::SpecialTokenPolicy};

/// A `[[models]]` entry: the fields every model has, and its provider's own.
pub(super) struct RawModel {
    pub(super) name: Spanned<String>,
    pub(super) max_tokens: Option<Spanned<u32>>,
    pub(super) max_tokens_limit: Option<Spanned<u32>>,
    pub(super) temperature: Option<Spanned<f64>>,
    /// `refuse` (the default) or `escape` user text that holds the special tokens of the
    /// prompt the gateway renders for this model.
    pub(super) special_tokens: Option<SpecialTokenPolicy>,
    /// Overrides of the top-level `[upstream]` table for this model.
    pub(super) upstream: Option<RawUpstream>,
    pub(super) provider: ProviderConfig,
}

/// The fields every model entry has besides `provider`, for messages.
const MODEL_FIELDS: &str = "`name`, `provider`, `max_tokens`, `max_tokens_limit`, `temperature`, `special_tokens`, `upstream`";

/// Reads the `[[models]]` entries. An entry's keys are read straight from the TOML
/// deserializer, so that each keeps its span: the fields every model has are taken here,
/// the others go to the [`ProviderConfig`] arm its `provider` names (a struct with
/// `deny_unknown_fields`). serde's own internally tagged enums buffer the entry and lose
/// the spans, hence the two passes: the tags first, then the entries. On an unknown field,
/// `key_span` holds where its key is.
pub(super) fn read_models(
    text: &str,
    key_span: &Cell<Option<Range<usize>>>,
) -> Result<Vec<RawModel>, toml::de::Error> {
    #[derive(Deserialize)]
    struct Tags {
        #[serde(default)]
        models: Vec<Tag>,
    }
    #[derive(Deserialize)]
    struct Tag {
        provider: Spanned<String>,
    }
    let tags = toml::from_str::<Tags>(text)?.models;
    ModelsSeed {
        tags: &tags.iter().map(|tag| &tag.provider).collect::<Vec<_>>(),
        key_span,
    }
    .deserialize(toml::Deserializer::new(text))
}

#[derive(Clone, Copy)]
struct ModelsSeed<'a> {
    tags: &'a [&'a Spanned<String>],
    key_span: &'a Cell<Option<Range<usize>>>,
}

impl<'de> DeserializeSeed<'de> for ModelsSeed<'_> {
    type Value = Vec<RawModel>;

    fn deserialize<D: serde::Deserializer<'de>>(self, root: D) -> Result<Self::Value, D::Error> {
        root.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ModelsSeed<'_> {
    type Value = Vec<RawModel>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a table with `[[models]]` entries")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut root: A) -> Result<Self::Value, A::Error> {
        let mut models = Vec::new();
        while let Some(key) = root.next_key::<String>()? {
            if key == "models" {
                models = root.next_value_seed(EntriesSeed(self))?;
            } else {
                root.next_value::<IgnoredAny>()?;
            }
        }
        Ok(models)
    }
}

struct EntriesSeed<'a>(ModelsSeed<'a>);

impl<'de> DeserializeSeed<'de> for EntriesSeed<'_> {
    type Value = Vec<RawModel>;

    fn deserialize<D: serde::Deserializer<'de>>(self, list: D) -> Result<Self::Value, D::Error> {
        list.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for EntriesSeed<'_> {
    type Value = Vec<RawModel>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of model entries")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut list: A) -> Result<Self::Value, A::Error> {
        let mut models = Vec::with_capacity(self.0.tags.len());
        for tag in self.0.tags {
            let entry = EntrySeed {
                tag,
                key_span: self.0.key_span,
            };
            match list.next_element_seed(entry)? {
                Some(model) => models.push(model),
                None => break,
            }
        }
        Ok(models)
    }
}

struct EntrySeed<'a> {
    tag: &'a Spanned<String>,
    key_span: &'a Cell<Option<Range<usize>>>,
}

impl<'de> DeserializeSeed<'de> for EntrySeed<'_> {
    type Value = RawModel;

    fn deserialize<D: serde::Deserializer<'de>>(self, entry: D) -> Result<RawModel, D::Error> {
        entry.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EntrySeed<'_> {
    type Value = RawModel;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a model entry")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut entry: A) -> Result<RawModel, A::Error> {
        let mut common = CommonFields::default();
        let provider = ProviderConfig::deserialize(EnumAccessDeserializer::new(Tagged {
            tag: self.tag,
            fields: ProviderFields {
                tag: self.tag.get_ref(),
                entry: &mut entry,
                common: &mut common,
                key_span: self.key_span,
            },
        }))?;
        Ok(RawModel {
            name: common.name.ok_or_else(|| A::Error::missing_field("name"))?,
            max_tokens: common.max_tokens,
            max_tokens_limit: common.max_tokens_limit,
            temperature: common.temperature,
            special_tokens: common.special_tokens,
            upstream: common.upstream,
            provider,
        })
    }
}

#[derive(Default)]
struct CommonFields {
    name: Option<Spanned<String>>,
    max_tokens: Option<Spanned<u32>>,
    max_tokens_limit: Option<Spanned<u32>>,
    temperature: Option<Spanned<f64>>,
    special_tokens: Option<SpecialTokenPolicy>,
    upstream: Option<RawUpstream>,
}

/// An entry as the enum of providers sees it: the variant its `provider` names, with the
/// entry's other fields as the variant's struct.
struct Tagged<'a, 'm, A> {
    tag: &'a Spanned<String>,
    fields: ProviderFields<'a, 'm, A>,
}

impl<'de, 'a, 'm, A: MapAccess<'de>> EnumAccess<'de> for Tagged<'a, 'm, A> {
    type Error = A::Error;
    type Variant = ProviderFields<'a, 'm, A>;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, Self::Variant), A::Error> {
        let name: serde::de::value::StrDeserializer<A::Error> =
            self.tag.get_ref().as_str().into_deserializer();
        match seed.deserialize(name) {
            Ok(variant) => Ok((variant, self.fields)),
            Err(err) => {
                self.fields.key_span.set(Some(self.tag.span()));
                Err(err)
            }
        }
    }
}

/// The keys of an entry, less the fields every model has (taken into `common` on the way).
struct ProviderFields<'a, 'm, A> {
    tag: &'a str,
    entry: &'m mut A,
    common: &'a mut CommonFields,
    key_span: &'a Cell<Option<Range<usize>>>,
}

impl<'de, A: MapAccess<'de>> VariantAccess<'de> for ProviderFields<'_, '_, A> {
    type Error = A::Error;

    fn unit_variant(self) -> Result<(), A::Error> {
        Err(A::Error::custom("a provider has fields"))
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, A::Error> {
        seed.deserialize(serde::de::value::MapAccessDeserializer::new(self))
    }

    fn tuple_variant<V: Visitor<'de>>(self, _: usize, visitor: V) -> Result<V::Value, A::Error> {
        visitor.visit_map(self)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        visitor.visit_map(self)
    }
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for ProviderFields<'_, '_, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        loop {
            let Some(key) = self.entry.next_key::<Spanned<String>>()? else {
                return Ok(None);
            };
            let common = &mut *self.common;
            match key.get_ref().as_str() {
                "provider" => {
                    self.entry.next_value::<IgnoredAny>()?;
                }
                "name" => common.name = Some(self.entry.next_value()?),
                "max_tokens" => common.max_tokens = Some(self.entry.next_value()?),
                "max_tokens_limit" => common.max_tokens_limit = Some(self.entry.next_value()?),
                "temperature" => common.temperature = Some(self.entry.next_value()?),
                "special_tokens" => common.special_tokens = Some(self.entry.next_value()?),
                "upstream" => common.upstream = Some(self.entry.next_value()?),
                _ => {
                    let span = key.span();
                    let name: serde::de::value::StringDeserializer<A::Error> =
                        key.into_inner().into_deserializer();
                    return seed.deserialize(name).map(Some).map_err(|err| {
                        self.key_span.set(Some(span));
                        A::Error::custom(format!(
                            "{} for provider \"{}\", or one of {MODEL_FIELDS}",
                            err.to_string().trim_end(),
                            self.tag
                        ))
                    });
                }
            }
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.entry.next_value_seed(seed)
    }
}
