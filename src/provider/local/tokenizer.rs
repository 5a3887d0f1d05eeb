//! The tokenizer, built from the GGUF's own vocabulary (`tokenizer.ggml.*`): byte-level BPE
//! (`gpt2`: SmolLM, Llama 3, Qwen2) with candle's GGUF reader, corrected where candle's
//! pre-tokenizer differs from the model's reference one; SentencePiece (`llama`: Llama 2,
//! TinyLlama, Mistral) built here the way Hugging Face converts such vocabularies.

use candle_core::quantized::{gguf_file, tokenizer::TokenizerFromGguf};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, Tokenizer,
    decoders::{
        byte_fallback::ByteFallback, fuse::Fuse, sequence::Sequence as DecoderSequence,
        strip::Strip,
    },
    models::unigram::Unigram,
    normalizers::{Prepend, Replace, Sequence as NormalizerSequence},
    pre_tokenizers::{byte_level::ByteLevel, digits::Digits, sequence::Sequence},
};

const PRE_KEY: &str = "tokenizer.ggml.pre";
/// SentencePiece's word-boundary marker.
const SPACE: &str = "\u{2581}";

pub fn from_gguf(content: &gguf_file::Content) -> Result<Tokenizer, String> {
    let kind = metadata_string(content, "tokenizer.ggml.model").unwrap_or_default();
    match kind.as_str() {
        "gpt2" => byte_level_bpe(content),
        "llama" => sentencepiece(content),
        "" => Err("it has no tokenizer (tokenizer.ggml.model)".into()),
        other => Err(format!(
            "its tokenizer `{other}` is not supported (supported: gpt2, llama)"
        )),
    }
    .map_err(|err| format!("cannot build its tokenizer: {err}"))
}

fn byte_level_bpe(content: &gguf_file::Content) -> Result<Tokenizer, String> {
    let pre = metadata_string(content, PRE_KEY).unwrap_or_default();
    let tokenizer = match pre.as_str() {
        // Llama 3's GGUFs call its pre-tokenizer `llama-bpe`; candle knows it as `llama3`.
        "llama-bpe" => {
            let mut metadata = content.metadata.clone();
            metadata.insert(PRE_KEY.into(), gguf_file::Value::String("llama3".into()));
            Tokenizer::from_gguf(&gguf_file::Content {
                magic: content.magic,
                metadata,
                tensor_infos: Default::default(),
                tensor_data_offset: 0,
            })
        }
        _ => Tokenizer::from_gguf(content),
    };
    let mut tokenizer = tokenizer.map_err(|err| err.to_string())?;
    if pre == "smollm" {
        // SmolLM's tokenizer.json (and llama.cpp's `smollm` pre-tokenizer) split digits one
        // by one before the GPT-2 byte-level split; candle's default has no digit split.
        tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])));
    }
    Ok(tokenizer)
}

/// A SentencePiece vocabulary with scores, as a Unigram model with byte fallback (what
/// mistral.rs does), with Llama's `▁` word-boundary normalizer and decoder.
fn sentencepiece(content: &gguf_file::Content) -> Result<Tokenizer, String> {
    let array = |key: &str| {
        content
            .metadata
            .get(key)
            .and_then(|value| value.to_vec().ok())
            .ok_or_else(|| format!("`{key}` is missing"))
    };
    let tokens = array("tokenizer.ggml.tokens")?;
    let scores = array("tokenizer.ggml.scores")?;
    let types = array("tokenizer.ggml.token_type")?;
    let vocab = tokens
        .iter()
        .zip(scores)
        .map(|(token, score)| Ok((token.to_string()?.clone(), f64::from(score.to_f32()?))))
        .collect::<candle_core::Result<Vec<_>>>()
        .map_err(|err| format!("a malformed vocabulary: {err}"))?;
    let unknown = [
        "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.unk_token_id",
    ]
    .iter()
    .find_map(|key| content.metadata.get(*key)?.to_u32().ok())
    .unwrap_or(0) as usize;
    let specials: Vec<AddedToken> = vocab
        .iter()
        .zip(types)
        // llama.cpp's token types: 3 = control (<s>, </s>), 4 = user-defined.
        .filter(|(_, kind)| matches!(kind.to_i32(), Ok(3 | 4)))
        .map(|((token, _), _)| AddedToken::from(token.clone(), true))
        .collect();
    let model = Unigram::from(vocab, Some(unknown), true).map_err(|err| err.to_string())?;
    let add_space_prefix = content
        .metadata
        .get("tokenizer.ggml.add_space_prefix")
        .and_then(|value| value.to_bool().ok())
        .unwrap_or(true);
    let mut tokenizer = Tokenizer::new(model);
    let space = Replace::new(" ", SPACE).map_err(|err| err.to_string())?;
    let mut normalizers: Vec<NormalizerWrapper> = vec![space.into()];
    let mut decoders: Vec<DecoderWrapper> = vec![
        Replace::new(SPACE, " ")
            .map_err(|err| err.to_string())?
            .into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        normalizers.insert(0, Prepend::new(SPACE.into()).into());
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    tokenizer
        .with_normalizer(Some(NormalizerSequence::new(normalizers)))
        .map_err(|err| err.to_string())?;
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    tokenizer
        .add_special_tokens(specials)
        .map_err(|err| err.to_string())?;
    Ok(tokenizer)
}

fn metadata_string(content: &gguf_file::Content, key: &str) -> Option<String> {
    content.metadata.get(key)?.to_string().ok().cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use gguf_file::Value;

    /// A SentencePiece GGUF's tokenizer metadata: `<unk>`, `<s>`, `</s>`, the 256 byte
    /// tokens, and a few words.
    fn sentencepiece_gguf() -> gguf_file::Content {
        let mut tokens = vec!["<unk>".to_owned(), "<s>".to_owned(), "</s>".to_owned()];
        let mut types = vec![2, 3, 3];
        for byte in 0..=255u8 {
            tokens.push(format!("<0x{byte:02X}>"));
            types.push(6);
        }
        for word in ["▁hello", "▁world", "▁h", "ello", "▁", "!"] {
            tokens.push(word.to_owned());
            types.push(1);
        }
        let scores = (0..tokens.len())
            .map(|index| Value::F32(-(index as f32)))
            .collect();
        let metadata = [
            ("tokenizer.ggml.model", Value::String("llama".into())),
            (
                "tokenizer.ggml.tokens",
                Value::Array(tokens.into_iter().map(Value::String).collect()),
            ),
            ("tokenizer.ggml.scores", Value::Array(scores)),
            (
                "tokenizer.ggml.token_type",
                Value::Array(types.into_iter().map(Value::I32).collect()),
            ),
            ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
        ];
        let mut file = std::io::Cursor::new(Vec::new());
        let refs: Vec<(&str, &Value)> = metadata.iter().map(|(key, value)| (*key, value)).collect();
        gguf_file::write(&mut file, &refs, &[]).unwrap();
        file.set_position(0);
        gguf_file::Content::read(&mut file).unwrap()
    }

    #[test]
    fn a_sentencepiece_vocabulary_encodes_words_bytes_and_control_tokens_and_decodes_back() {
        let tokenizer = from_gguf(&sentencepiece_gguf()).unwrap();
        let id = |token: &str| tokenizer.token_to_id(token).unwrap();
        let encoding = tokenizer.encode("<s>hello world!é", false).unwrap();
        assert_eq!(
            encoding.get_ids(),
            [
                id("<s>"),
                id("▁hello"),
                id("▁world"),
                id("!"),
                id("<0xC3>"),
                id("<0xA9>")
            ]
        );
        assert_eq!(
            tokenizer.decode(&encoding.get_ids()[1..], false).unwrap(),
            "hello world!é"
        );
        assert_eq!(
            tokenizer.decode(encoding.get_ids(), true).unwrap(),
            "hello world!é"
        );
    }

    #[test]
    fn an_unknown_tokenizer_kind_is_named() {
        let mut content = sentencepiece_gguf();
        content
            .metadata
            .insert("tokenizer.ggml.model".into(), Value::String("bert".into()));
        let err = from_gguf(&content).unwrap_err();
        assert!(err.contains("tokenizer `bert` is not supported"), "{err}");
    }
}
