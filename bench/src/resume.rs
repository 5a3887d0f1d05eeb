//! The memory of resumable streams: `n` SSE streams of a long answer run to their end with
//! `resume_window` on, so that every event of every stream stays held for the window; the
//! gateway's RSS before and after.

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt, stream};

use crate::{
    client::Connection,
    mock::Scenario,
    procs::{self, Process, Wrapper},
};

/// The answer each stream gets: 512 chunks (a long answer), at once.
pub const LONG: Scenario = Scenario::Paced {
    chunks: 512,
    pace: std::time::Duration::ZERO,
};
/// Streams run at once while filling the buffers.
const PARALLEL: usize = 64;

pub struct Held {
    pub streams: usize,
    /// Events held per stream: the chunks and the `done`.
    pub events_per_stream: usize,
    pub rss_baseline: u64,
    pub rss_held: u64,
}

/// Starts a gateway with `resume_window = "10m"`, runs `n` streams of [`LONG`] to their end
/// and measures what holding their events costs.
pub async fn buffered(binary: &std::path::Path, mock: &Process, n: usize) -> anyhow::Result<Held> {
    let gateway =
        procs::start_gateway(binary, mock.addr, Wrapper::None, r#"resume_window = "10m""#)?;
    let path = format!("/stream?model={}&prompt=hi", LONG.name());
    let addr = gateway.addr;
    let run = |count: usize| {
        let path = path.clone();
        stream::iter(0..count)
            .map(move |_| {
                let path = path.clone();
                async move {
                    let mut connection = Connection::open(addr).await?;
                    connection.call("GET", &path, &Bytes::new()).await
                }
            })
            .buffer_unordered(PARALLEL)
            .try_collect::<()>()
    };
    // The baseline is taken after one stream, so that the runtime's own pools are in it.
    run(1).await?;
    let rss_baseline = gateway.rss_bytes();
    run(n).await?;
    let rss_held = gateway.rss_bytes();
    let events_per_stream = match LONG {
        Scenario::Paced { chunks, .. } => chunks as usize + 1,
        Scenario::Silent => 1,
    };
    Ok(Held {
        streams: n,
        events_per_stream,
        rss_baseline,
        rss_held,
    })
}
