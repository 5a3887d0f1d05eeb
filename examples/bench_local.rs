//! Speed figures of a local model on this machine: fetch + load time, time to the first
//! token of a one-line prompt, decode tokens/s of one stream, resident memory.
//!
//! `cargo run --release --example bench_local [-- --config FILE] [-- MODEL]`

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use modelgate::{
    config::Config,
    provider::{Chunk, ModelState, UsageMeter},
    registry::Registry,
    request::GenerateRequest,
};

const RUNS: usize = 3;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let mut config_path = None;
    let mut model = "local".to_owned();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" => config_path = args.next().map(std::path::PathBuf::from),
            name => model = name.to_owned(),
        }
    }
    let config = Config::load(config_path.as_deref()).expect("a valid configuration");
    let started = Instant::now();
    let registry = Registry::build(&config).await;
    let entry = registry
        .get(&model)
        .expect("the model is in the registry")
        .clone();
    while entry.info().state == ModelState::Loading {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        entry.info().state,
        ModelState::Ready,
        "the model failed to load (see the log)"
    );
    println!(
        "model `{model}` ready after {:.2} s (fetch if needed + load)",
        started.elapsed().as_secs_f64()
    );

    for run in 1..=RUNS {
        let request = |prompt: &str, max_tokens| {
            let request = GenerateRequest {
                max_tokens: Some(max_tokens),
                temperature: Some(0.0),
                ..GenerateRequest::prompt(&model, prompt)
            };
            registry.prepare(request).expect("a valid request").1
        };
        let asked = Instant::now();
        let mut stream = entry
            .stream(
                request("What is the capital of France?", 1),
                UsageMeter::default(),
            )
            .await
            .expect("the model answers");
        stream
            .next()
            .await
            .expect("a first piece")
            .expect("no error");
        let first_token = asked.elapsed();
        while stream.next().await.is_some() {}

        let mut stream = entry
            .stream(
                request("Write a long story about a robot who learns to paint.", 200),
                UsageMeter::default(),
            )
            .await
            .expect("the model answers");
        let first = Instant::now();
        let mut output_tokens = 0;
        while let Some(chunk) = stream.next().await {
            if let Ok(Chunk::Done(finish)) = chunk {
                output_tokens = finish.usage.output_tokens;
            }
        }
        let decode = first.elapsed();
        println!(
            "run {run}: time to first token {:.0} ms; decode {:.1} tokens/s ({output_tokens} tokens in {:.2} s)",
            first_token.as_secs_f64() * 1000.0,
            f64::from(output_tokens.saturating_sub(1)) / decode.as_secs_f64(),
            decode.as_secs_f64()
        );
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    for line in status
        .lines()
        .filter(|line| line.starts_with("VmRSS") || line.starts_with("VmHWM"))
    {
        println!("{line}");
    }
}
