//! `POST /invoke` against the gateway and InvokeModel against the mock: one request at a
//! time, fixed open-loop rates, and the most the path can carry.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;

use crate::client::{Connection, InvokeCall, Target};

/// Latencies in nanoseconds.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("valid histogram bounds")
}

/// `count` requests one after the other on one connection, after `count / 10` to warm up.
pub async fn one_at_a_time(target: Target, count: usize) -> anyhow::Result<Histogram<u64>> {
    let call = InvokeCall::new(target);
    let mut connection = Connection::open(target.addr()).await?;
    for _ in 0..count / 10 {
        call.call(&mut connection).await?;
    }
    let mut latencies = histogram();
    for _ in 0..count {
        let started = Instant::now();
        call.call(&mut connection).await?;
        latencies.saturating_record(started.elapsed().as_nanos() as u64);
    }
    Ok(latencies)
}

pub struct OpenLoop {
    /// From each request's scheduled send time to its answer, so that a stall delays every
    /// request scheduled during it (no coordinated omission).
    pub latencies: Histogram<u64>,
    pub errors: u64,
}

/// Sends `rate` requests per second for `duration` over `connections` keep-alive
/// connections, whether or not earlier ones have been answered.
pub async fn open_loop(
    target: Target,
    rate: u32,
    duration: Duration,
    connections: usize,
) -> anyhow::Result<OpenLoop> {
    let call = Arc::new(InvokeCall::new(target));
    let mut opened = Vec::with_capacity(connections);
    for _ in 0..connections {
        opened.push(Connection::open(target.addr()).await?);
    }
    // All connections busy at once, a few times: the gateway's upstream pool is warm.
    let warm_ups = opened.iter_mut().map(|connection| {
        let call = call.clone();
        async move {
            for _ in 0..3 {
                call.call(connection).await?;
            }
            anyhow::Ok(())
        }
    });
    for warmed in futures_util::future::join_all(warm_ups).await {
        warmed?;
    }
    let (schedule, scheduled) = async_channel::unbounded::<Instant>();
    let workers: Vec<_> = opened
        .into_iter()
        .map(|mut connection| {
            let call = call.clone();
            let scheduled = scheduled.clone();
            tokio::spawn(async move {
                let mut latencies = histogram();
                let mut errors = 0;
                while let Ok(at) = scheduled.recv().await {
                    if call.call(&mut connection).await.is_err() {
                        errors += 1;
                    }
                    latencies.saturating_record(at.elapsed().as_nanos() as u64);
                }
                (latencies, errors)
            })
        })
        .collect();
    // Tokio's timer has a 1 ms granularity, too coarse for 5,000 sends per second: a
    // thread sleeps until each scheduled time and hands it to whichever connection is free.
    let total = (rate as f64 * duration.as_secs_f64()) as u32;
    let period = Duration::from_secs(1) / rate;
    let pacer = std::thread::spawn(move || {
        let start = Instant::now() + Duration::from_millis(10);
        for index in 0..total {
            let at = start + period * index;
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            if schedule.send_blocking(at).is_err() {
                break;
            }
        }
    });
    tokio::task::spawn_blocking(move || pacer.join())
        .await?
        .expect("the pacer thread does not panic");
    let mut result = OpenLoop {
        latencies: histogram(),
        errors: 0,
    };
    for worker in workers {
        let (latencies, errors) = worker.await?;
        result.latencies.add(&latencies)?;
        result.errors += errors;
    }
    Ok(result)
}

pub struct Throughput {
    pub per_second: f64,
    /// CPU seconds `cpu_seconds` counted during the measured window, per request.
    pub cpu_per_request: f64,
}

/// As many requests as `connections` connections can carry, each sending its next request
/// as soon as the last is answered; counted for `measure` after `warm_up`.
pub async fn most(
    target: Target,
    connections: usize,
    warm_up: Duration,
    measure: Duration,
    cpu_seconds: impl Fn() -> f64,
) -> anyhow::Result<Throughput> {
    let call = InvokeCall::new(target);
    most_of(
        call,
        target.addr(),
        connections,
        warm_up,
        measure,
        cpu_seconds,
    )
    .await
}

/// [`most`] of any request.
pub async fn most_of(
    call: InvokeCall,
    addr: std::net::SocketAddr,
    connections: usize,
    warm_up: Duration,
    measure: Duration,
    cpu_seconds: impl Fn() -> f64,
) -> anyhow::Result<Throughput> {
    let call = Arc::new(call);
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::with_capacity(connections);
    for _ in 0..connections {
        let mut connection = Connection::open(addr).await?;
        let (call, done, stop) = (call.clone(), done.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                call.call(&mut connection).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(warm_up).await;
    let (before, cpu_before, started) =
        (done.load(Ordering::Relaxed), cpu_seconds(), Instant::now());
    tokio::time::sleep(measure).await;
    let (after, cpu_after, window) = (
        done.load(Ordering::Relaxed),
        cpu_seconds(),
        started.elapsed(),
    );
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await??;
    }
    let requests = (after - before) as f64;
    Ok(Throughput {
        per_second: requests / window.as_secs_f64(),
        cpu_per_request: (cpu_after - cpu_before) / requests,
    })
}
