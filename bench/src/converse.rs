//! ConverseStream in the bench: the mock's typed events (each chunk a `contentBlockDelta`
//! whose text is the mock's clock, the first preceded by `messageStart`, the last followed
//! by `contentBlockStop`, `messageStop` and `metadata`, as Bedrock sends them), and what a
//! client reading the mock directly makes of them.

use aws_smithy_types::event_stream::Message;
use bytes::Bytes;

use crate::mock::write_event;

/// The request a direct client sends (the mock reads it whole and ignores it).
pub const REQUEST: &[u8] =
    br#"{"messages":[{"role":"user","content":[{"text":"hi"}]}],"inferenceConfig":{"maxTokens":512}}"#;

/// The events of one chunk, in one write.
pub fn frames(stamp: u64, first: bool, last: bool) -> Bytes {
    let mut out = Vec::with_capacity(if first || last { 512 } else { 160 });
    if first {
        write_event(
            &mut out,
            "messageStart",
            br#"{"role":"assistant"}"#.to_vec(),
        );
    }
    write_event(
        &mut out,
        "contentBlockDelta",
        format!(r#"{{"delta":{{"text":"{stamp}"}},"contentBlockIndex":0}}"#).into_bytes(),
    );
    if last {
        write_event(
            &mut out,
            "contentBlockStop",
            br#"{"contentBlockIndex":0}"#.to_vec(),
        );
        write_event(
            &mut out,
            "messageStop",
            br#"{"stopReason":"end_turn"}"#.to_vec(),
        );
        write_event(
            &mut out,
            "metadata",
            br#"{"usage":{"inputTokens":19,"outputTokens":64,"totalTokens":83},"metrics":{"latencyMs":1}}"#
                .to_vec(),
        );
    }
    Bytes::from(out)
}

/// The stamp of a `contentBlockDelta` event; `None` for the other events.
pub fn stamp_of_frame(message: &Message) -> Option<u64> {
    let is_delta = message.headers().iter().any(|header| {
        header.name().as_str() == ":event-type"
            && header
                .value()
                .as_string()
                .is_ok_and(|value| value.as_str() == "contentBlockDelta")
    });
    if !is_delta {
        return None;
    }
    let payload: serde_json::Value = serde_json::from_slice(message.payload()).ok()?;
    payload["delta"]["text"].as_str()?.parse().ok()
}
