//! `POST /v1/chat/completions` next to `/invoke` and `/stream`, through the same gateway in
//! the same run: CPU per whole request, and for streams the time to first chunk and the CPU
//! per chunk. The baseline column of these rows is the gateway's own API, not the mock.

use bytes::Bytes;

use crate::{
    client::{InvokeCall, Target},
    invoke, micros,
    procs::{INVOKE_MODEL, Process},
    report::{Derived, Report},
    streams::{self, Transport},
};

/// A streamed chat completion of `model`, as an OpenAI SDK sends it.
pub fn stream_request(model: &str) -> Bytes {
    Bytes::from(format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}],"stream":true}}"#
    ))
}

/// The `/invoke` bench request as a chat completion.
pub fn whole_request() -> Bytes {
    Bytes::from(format!(
        r#"{{"model":"{INVOKE_MODEL}","messages":[{{"role":"user","content":"What is the capital of France?"}}]}}"#
    ))
}

/// What one event of a streamed chat completion holds.
pub enum Data {
    /// A piece of the answer: the mock writes its stamp as the text.
    Piece(u64),
    /// The role or the finish reason.
    Other,
    Done,
}

/// Reads one event (`data: …` and the blank line).
pub fn parse_data(block: &str) -> anyhow::Result<Data> {
    let data = block
        .lines()
        .find_map(|line| line.strip_prefix("data:"))
        .map(str::trim)
        .ok_or_else(|| anyhow::anyhow!("an event without data: {block}"))?;
    if data == "[DONE]" {
        return Ok(Data::Done);
    }
    let chunk: serde_json::Value = serde_json::from_str(data)?;
    if chunk.get("error").is_some() {
        anyhow::bail!("the stream failed: {data}");
    }
    match chunk["choices"][0]["delta"]["content"].as_str() {
        Some("") | None => Ok(Data::Other),
        Some(text) => Ok(Data::Piece(
            text.parse()
                .map_err(|_| anyhow::anyhow!("a piece reads {text}"))?,
        )),
    }
}

/// The OpenAI rows of one run, with the gateway's own API as the baseline.
pub async fn measure(report: &mut Report, gateway: &Process) -> anyhow::Result<()> {
    report.group(
        "POST /v1/chat/completions (second column: POST /invoke, same gateway, same run): most requests/s, 64 connections",
    );
    let (warm_up, measure) = (
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(3),
    );
    let cpu = || gateway.cpu_seconds();
    let openai = invoke::most_of(
        InvokeCall::chat_completion(),
        gateway.addr,
        64,
        warm_up,
        measure,
        cpu,
    )
    .await?;
    let native = invoke::most(Target::Gateway(gateway.addr), 64, warm_up, measure, cpu).await?;
    report.record(
        "gateway CPU per request",
        "µs",
        openai.cpu_per_request * 1e6,
        Some(native.cpu_per_request * 1e6),
        Derived::Added,
        None,
    );
    report.record(
        "throughput",
        "/s",
        openai.per_second,
        Some(native.per_second),
        Derived::Ratio,
        None,
    );

    report.group(
        "Streamed /v1/chat/completions (second column: GET /stream, same gateway, same run)",
    );
    let through = streams::first_chunk(Transport::OpenAi, gateway.addr, 300).await?;
    let native = streams::first_chunk(Transport::Sse, gateway.addr, 300).await?;
    for (label, percentile) in [("p50", 50.0), ("p99", 99.0)] {
        report.record(
            &format!("first chunk {label}"),
            "µs",
            micros(&through, percentile),
            Some(micros(&native, percentile)),
            Derived::Added,
            None,
        );
    }
    let streams = 100;
    let through = streams::paced(Transport::OpenAi, gateway.addr, streams, cpu).await?;
    let native = streams::paced(Transport::Sse, gateway.addr, streams, cpu).await?;
    let per_chunk = |paced: &streams::Paced| paced.cpu * 1e6 / paced.chunks_in_window.max(1) as f64;
    report.record(
        &format!("gateway CPU per chunk, {streams} paced streams"),
        "µs",
        per_chunk(&through),
        Some(per_chunk(&native)),
        Derived::Added,
        None,
    );
    report.record(
        &format!("per-chunk delay p99, {streams} paced streams"),
        "µs",
        micros(&through.delays, 99.0),
        Some(micros(&native.delays, 99.0)),
        Derived::Added,
        None,
    );
    report.record(
        "streams incomplete",
        "",
        through.failed as f64,
        Some(native.failed as f64),
        Derived::None,
        None,
    );
    Ok(())
}
