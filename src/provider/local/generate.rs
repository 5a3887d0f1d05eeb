//! One generation on a worker thread: prompt → tokens → forward passes → text pieces sent to
//! the client as soon as they are whole characters.

use std::{collections::hash_map::RandomState, hash::BuildHasher, time::Instant};

use candle_transformers::{generation::LogitsProcessor, utils::apply_repeat_penalty};
use tokio::sync::mpsc::UnboundedSender;

use super::model::{Network, Vocabulary};
use crate::{
    error::{Error, Result},
    provider::{Chunk, Finish, StopMatcher, StopReason, StopScan, Usage},
    request::ValidRequest,
};

/// How many recent tokens the repeat penalty looks at (llama.cpp's `repeat_last_n`).
const REPEAT_WINDOW: usize = 64;

/// Sampling settings from the model's configuration.
#[derive(Debug, Clone, Copy)]
pub struct Sampling {
    pub repeat_penalty: f32,
    pub seed: Option<u64>,
}

/// A request and where its chunks go. A closed `chunks` means the client has gone.
pub struct Job {
    pub request: ValidRequest,
    pub chunks: UnboundedSender<Result<Chunk>>,
}

/// Runs `job` to its end, or until its client goes away.
pub fn run(network: &mut Network, vocabulary: &Vocabulary, sampling: Sampling, job: Job) {
    if job.chunks.is_closed() {
        return;
    }
    if let Err(err) = generate(network, vocabulary, sampling, &job) {
        let _ = job.chunks.send(Err(err));
    }
}

fn generate(
    network: &mut Network,
    vocabulary: &Vocabulary,
    sampling: Sampling,
    job: &Job,
) -> Result<()> {
    let started = Instant::now();
    let request = &job.request;
    let prompt = vocabulary.template.render(request)?;
    // Special tokens are parsed: the template's control tokens must be. The user text has
    // none to parse: validation refused or broke them (see `SpecialTokens::guard`).
    let encoding = vocabulary
        .tokenizer
        .encode(prompt, false)
        .map_err(|err| Error::Upstream(format!("cannot tokenize the prompt: {err}")))?;
    let mut tokens = encoding.get_ids().to_vec();
    let prompt_tokens = tokens.len();
    if prompt_tokens >= vocabulary.context_length {
        return Err(Error::InvalidRequest(format!(
            "the prompt is {prompt_tokens} tokens long; this model's context holds {}",
            vocabulary.context_length
        )));
    }
    let max_tokens = (request.max_tokens as usize).min(vocabulary.context_length - prompt_tokens);
    let seed = sampling
        .seed
        .unwrap_or_else(|| RandomState::new().hash_one(Instant::now()));
    let mut sampler = LogitsProcessor::new(seed, request.temperature, request.top_p);
    let mut stop = StopMatcher::new(request.stop.clone());
    let mut text = vocabulary.tokenizer.decode_stream(true);
    let failed =
        |err: candle_core::Error| Error::Upstream(format!("the local model failed: {err}"));

    network.clear_kv_cache();
    let mut logits = network.forward(&tokens, 0).map_err(failed)?;
    let mut generated = 0;
    let stop_reason = loop {
        if sampling.repeat_penalty != 1.0 {
            let recent = &tokens[tokens.len().saturating_sub(REPEAT_WINDOW)..];
            logits =
                apply_repeat_penalty(&logits, sampling.repeat_penalty, recent).map_err(failed)?;
        }
        let next = sampler.sample(&logits).map_err(failed)?;
        generated += 1;
        if generated == 1 {
            tracing::debug!(
                prompt_tokens,
                first_token_ms = started.elapsed().as_millis() as u64,
                "local generation started"
            );
        }
        if vocabulary.end_of_turn.contains(&next) {
            break StopReason::EndTurn;
        }
        tokens.push(next);
        let piece = text
            .step(next)
            .map_err(|err| Error::Upstream(format!("cannot decode the model's output: {err}")))?;
        if let Some(piece) = piece {
            match stop.push(&piece) {
                StopScan::Continue(piece) => {
                    if !piece.is_empty() && job.chunks.send(Ok(Chunk::Text(piece))).is_err() {
                        return client_gone(generated);
                    }
                }
                StopScan::Stop(piece) => {
                    if !piece.is_empty() {
                        let _ = job.chunks.send(Ok(Chunk::Text(piece)));
                    }
                    break StopReason::StopSequence;
                }
            }
        }
        if generated == max_tokens {
            break StopReason::MaxTokens;
        }
        if job.chunks.is_closed() {
            return client_gone(generated);
        }
        logits = network.forward(&[next], tokens.len() - 1).map_err(failed)?;
    };
    let held = stop.finish();
    if !held.is_empty() {
        let _ = job.chunks.send(Ok(Chunk::Text(held)));
    }
    let usage = Usage::new(prompt_tokens as u32, generated as u32);
    tracing::debug!(
        output_tokens = generated,
        secs = started.elapsed().as_secs_f32(),
        "local generation done"
    );
    let _ = job
        .chunks
        .send(Ok(Chunk::Done(Finish { stop_reason, usage })));
    Ok(())
}

/// Ends a generation whose client has gone.
fn client_gone(generated: usize) -> Result<()> {
    tracing::info!(
        output_tokens = generated,
        "local generation stopped: client gone"
    );
    Ok(())
}
