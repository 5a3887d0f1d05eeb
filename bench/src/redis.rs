//! What per-key limits cost a request: the same gateway with no key limits, with limits
//! kept in process, and with limits shared through Redis (`[cluster] redis_url`, a
//! `redis-server` on loopback started here). Every limit is set so high that nothing is
//! refused: each request pays the checks (one script per request, one more to settle its
//! tokens), never a refusal.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;

use crate::{
    client::{AUTHORIZATION, Target},
    invoke,
    procs::{self, Process, Wrapper},
    streams::{self, Transport},
};

/// Every limit a key has, none of which the bench reaches.
const LIMITS: &str = "api_key_limits = { requests_per_minute = 1000000000, tokens_per_minute = 2000000000, \
                      concurrent_streams = 100000, tokens_per_day = 1000000000000, tokens_per_month = 1000000000000 }";

/// Where the limits are kept.
#[derive(Clone, Copy)]
pub enum Keeper {
    /// No key limits at all (the key is still checked).
    None,
    InProcess,
    Redis,
}

impl Keeper {
    pub const ALL: [Keeper; 3] = [Keeper::None, Keeper::InProcess, Keeper::Redis];

    pub fn name(self) -> &'static str {
        match self {
            Keeper::None => "no key limits",
            Keeper::InProcess => "limits in process",
            Keeper::Redis => "limits in Redis",
        }
    }
}

/// A `redis-server` on a free loopback port, without persistence.
pub fn start_redis() -> anyhow::Result<Process> {
    let addr = procs::free_port()?;
    let child = Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &addr.port().to_string()])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting redis-server (apt-get install redis-server)")?;
    let process = Process { child, addr };
    let started = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        if started.elapsed() > Duration::from_secs(10) {
            bail!("redis-server did not listen on {addr} within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(process)
}

/// The gateway with the bench's key and its limits kept by `keeper`.
pub fn start_gateway(
    binary: &Path,
    mock: SocketAddr,
    keeper: Keeper,
    redis: SocketAddr,
) -> anyhow::Result<Process> {
    let key = format!("bench:{}", AUTHORIZATION.trim_start_matches("Bearer "));
    let redis_url = format!("redis://{redis}");
    let mut env = vec![("MODELGATE_API_KEYS", key.as_str())];
    let settings = match keeper {
        Keeper::None => "",
        Keeper::InProcess => LIMITS,
        Keeper::Redis => {
            env.push(("MODELGATE_REDIS_URL", redis_url.as_str()));
            LIMITS
        }
    };
    procs::start_gateway_with_env(binary, mock, Wrapper::None, settings, &env)
}

/// One keeper's figures.
pub struct Figures {
    pub invoke: Histogram<u64>,
    pub most: invoke::Throughput,
    /// CPU seconds of redis-server per request in the closed loop.
    pub redis_cpu_per_request: f64,
    pub first_chunk: Histogram<u64>,
}

pub async fn measure(
    binary: &Path,
    mock: &Process,
    redis: &Process,
    keeper: Keeper,
) -> anyhow::Result<Figures> {
    let gateway = start_gateway(binary, mock.addr, keeper, redis.addr)?;
    let target = Target::Gateway(gateway.addr);
    let invoke = invoke::one_at_a_time(target, 2000).await?;
    let redis_before = redis.cpu_seconds();
    let (warm_up, window) = (Duration::from_secs(1), Duration::from_secs(3));
    let most = invoke::most(target, 64, warm_up, window, || gateway.cpu_seconds()).await?;
    let redis_cpu = redis.cpu_seconds() - redis_before;
    // Requests over the warm-up and the window, and the drain, roughly: the figure is per
    // request of the window.
    let redis_cpu_per_request =
        redis_cpu / (most.per_second * (warm_up + window).as_secs_f64()).max(1.0);
    let first_chunk = streams::first_chunk(Transport::Sse, gateway.addr, 300).await?;
    Ok(Figures {
        invoke,
        most,
        redis_cpu_per_request,
        first_chunk,
    })
}
