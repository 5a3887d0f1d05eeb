//! A GGUF file turned into something that generates: the network, its tokenizer, its chat
//! template and its end-of-turn tokens.

use std::{
    collections::HashSet,
    fs::File,
    io::{Cursor, Read, Seek},
    path::Path,
    sync::Arc,
};

use candle_core::{
    Device, Tensor,
    quantized::{GgmlDType, QTensor, gguf_file},
};
use candle_transformers::models::{quantized_llama, quantized_qwen2};
use tokenizers::Tokenizer;

use super::{template::ChatTemplate, tokenizer};
use crate::special_tokens::SpecialTokens;

/// Architectures (`general.architecture`) this provider runs.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama", "qwen2"];

/// Special tokens that end a turn in the chat formats of common GGUFs, besides the file's own
/// `eos` and `eot` ids (the set llama.cpp also treats as end of generation).
const END_OF_TURN_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|endoftext|>",
    "<end_of_turn>",
    "</s>",
];

/// Everything a worker needs besides its own network: shared by all workers of a model.
pub struct Vocabulary {
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    /// Tokens after which the answer is complete (`end_turn`).
    pub end_of_turn: HashSet<u32>,
    /// Most tokens (prompt and answer) one generation may hold.
    pub context_length: usize,
    /// The tokens the tokenizer reads from text as special (control) tokens: user text has
    /// none of them (see [`SpecialTokens::guard`]).
    pub special_tokens: Arc<SpecialTokens>,
}

/// A transformer with its own KV cache. Forward passes take `&mut self`: one per worker.
pub enum Network {
    Llama(quantized_llama::ModelWeights),
    Qwen2(quantized_qwen2::ModelWeights),
}

impl Network {
    /// Logits for the last position of `tokens`, which start at `position` in the context.
    pub fn forward(&mut self, tokens: &[u32], position: usize) -> candle_core::Result<Tensor> {
        let input = Tensor::new(tokens, &Device::Cpu)?.unsqueeze(0)?;
        let logits = match self {
            Network::Llama(model) => model.forward(&input, position)?,
            Network::Qwen2(model) => model.forward(&input, position)?,
        };
        logits.squeeze(0)
    }

    /// Forgets the previous conversation.
    pub fn clear_kv_cache(&mut self) {
        match self {
            Network::Llama(model) => model.clear_kv_cache(),
            Network::Qwen2(model) => model.clear_kv_cache(),
        }
    }
}

/// A loaded model: the vocabulary and one network per worker.
pub struct Loaded {
    pub vocabulary: Arc<Vocabulary>,
    pub networks: Vec<Network>,
    pub architecture: String,
}

/// Reads `path` and builds `workers` networks. Llama networks share one copy of the weights
/// (candle's tensors are reference-counted); candle's Qwen2 model cannot be cloned, so each
/// Qwen2 worker reads its own.
pub fn load(path: &Path, workers: usize) -> Result<Loaded, String> {
    let mut file = File::open(path).map_err(|err| format!("cannot open it: {err}"))?;
    let content = gguf_file::Content::read(&mut file)
        .map_err(|err| format!("it is not a readable GGUF file ({err})"))?;
    let architecture = metadata_string(&content, "general.architecture")
        .ok_or("it names no architecture (general.architecture): it is not a model GGUF")?;
    if !SUPPORTED_ARCHITECTURES.contains(&architecture.as_str()) {
        return Err(format!(
            "its architecture `{architecture}` is not supported (supported: {})",
            SUPPORTED_ARCHITECTURES.join(", ")
        ));
    }
    let vocabulary = Arc::new(vocabulary(&content, &architecture)?);
    let (content, mut reader) = requantize(content, file)?;
    let device = Device::Cpu;
    let corrupt = |err: candle_core::Error| format!("its weights cannot be loaded: {err}");
    let networks = match architecture.as_str() {
        "llama" => {
            let model = quantized_llama::ModelWeights::from_gguf(content, &mut reader, &device)
                .map_err(corrupt)?;
            (0..workers)
                .map(|_| Network::Llama(model.clone()))
                .collect()
        }
        _ => {
            let mut networks = Vec::with_capacity(workers);
            for _ in 0..workers {
                reader.rewind().map_err(|err| err.to_string())?;
                let content = gguf_file::Content::read(&mut reader).map_err(corrupt)?;
                networks.push(Network::Qwen2(
                    quantized_qwen2::ModelWeights::from_gguf(content, &mut reader, &device)
                        .map_err(corrupt)?,
                ));
            }
            networks
        }
    };
    Ok(Loaded {
        vocabulary,
        networks,
        architecture,
    })
}

fn vocabulary(content: &gguf_file::Content, architecture: &str) -> Result<Vocabulary, String> {
    let source = metadata_string(content, "tokenizer.chat_template").ok_or(
        "it has no chat template (tokenizer.chat_template): use a chat (instruct) model's GGUF",
    )?;
    let tokenizer = tokenizer::from_gguf(content)?;
    let token_text = |key: &str| {
        content
            .metadata
            .get(key)
            .and_then(|id| id.to_u32().ok())
            .and_then(|id| tokenizer.id_to_token(id))
            .unwrap_or_default()
    };
    let template = ChatTemplate::new(
        source,
        token_text("tokenizer.ggml.bos_token_id"),
        token_text("tokenizer.ggml.eos_token_id"),
    )
    .map_err(|err| format!("its chat template does not compile: {err}"))?;
    let end_of_turn: HashSet<u32> = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
        .iter()
        .filter_map(|key| content.metadata.get(*key)?.to_u32().ok())
        .chain(
            END_OF_TURN_TEXTS
                .iter()
                .filter_map(|text| tokenizer.token_to_id(text)),
        )
        .collect();
    if end_of_turn.is_empty() {
        return Err("it names no end-of-turn token (tokenizer.ggml.eos_token_id)".into());
    }
    let context_length = content
        .metadata
        .get(&format!("{architecture}.context_length"))
        .and_then(|length| length.to_u32().ok())
        .map_or(quantized_llama::MAX_SEQ_LEN, |length| length as usize)
        // candle's llama precomputes its rotary embeddings for MAX_SEQ_LEN positions.
        .min(quantized_llama::MAX_SEQ_LEN);
    let special_tokens = tokenizer
        .get_added_tokens_decoder()
        .into_values()
        .filter(|token| token.special)
        .map(|token| token.content);
    let special_tokens = Arc::new(SpecialTokens::new(special_tokens)?);
    Ok(Vocabulary {
        tokenizer,
        template,
        end_of_turn,
        context_length,
        special_tokens,
    })
}

fn metadata_string(content: &gguf_file::Content, key: &str) -> Option<String> {
    content.metadata.get(key)?.to_string().ok().cloned()
}

/// What the model loaders read tensors from: the file, or an in-memory re-encoding of it.
trait Weights: Read + Seek {}
impl<T: Read + Seek> Weights for T {}

/// Tensor types that candle's CPU kernels multiply without SIMD.
fn slow_on_cpu(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1)
}

/// candle's CPU kernels for Q4_1, Q5_0 and Q5_1 have no SIMD path, Q8_0's has: a file with
/// such weights is converted to Q8_0 once, at load time, into an in-memory GGUF that the
/// model reads. Other files are read as they are.
fn requantize(
    content: gguf_file::Content,
    mut file: File,
) -> Result<(gguf_file::Content, Box<dyn Weights>), String> {
    if !content
        .tensor_infos
        .values()
        .any(|info| slow_on_cpu(info.ggml_dtype))
    {
        return Ok((content, Box::new(file)));
    }
    let failed = |err: candle_core::Error| format!("its weights cannot be read: {err}");
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors: Vec<(&str, QTensor)> = Vec::with_capacity(names.len());
    for name in names {
        let tensor = content
            .tensor(&mut file, name, &Device::Cpu)
            .map_err(failed)?;
        let tensor = if slow_on_cpu(tensor.dtype()) {
            let values = tensor.dequantize(&Device::Cpu).map_err(failed)?;
            QTensor::quantize(&values, GgmlDType::Q8_0).map_err(failed)?
        } else {
            tensor
        };
        tensors.push((name, tensor));
    }
    let metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(key, value)| (key.as_str(), value))
        .collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors
        .iter()
        .map(|(name, tensor)| (*name, tensor))
        .collect();
    let mut buffer = Cursor::new(Vec::new());
    gguf_file::write(&mut buffer, &metadata, &tensor_refs).map_err(failed)?;
    drop(tensors);
    buffer.rewind().map_err(|err| err.to_string())?;
    let content = gguf_file::Content::read(&mut buffer).map_err(failed)?;
    Ok((content, Box::new(buffer)))
}
