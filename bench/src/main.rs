//! modelgate-bench: measures what the gateway adds, side by side with the upstream served
//! directly, on this machine (README: "Benchmark").
//!
//! Three processes: this one (the clients), the mock upstream (this binary's `mock`
//! subcommand) and the release gateway, which reaches the mock through the AWS SDK with
//! SigV4 exactly as it reaches Bedrock. Each measurement is made through the gateway and
//! against the mock directly in the same run; each figure is the median of `--runs` runs.

mod client;
mod clock;
mod connections;
mod converse;
mod invoke;
mod mock;
mod openai;
mod procs;
mod profile;
mod redis;
mod report;
mod resume;
mod streams;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;

use crate::{
    client::Target,
    procs::{Process, Wrapper},
    report::{Derived, Report, Target as Goal},
    streams::Transport,
};

#[derive(Parser)]
#[command(about = "Measures what modelgate adds, side by side with the upstream served directly")]
struct Cli {
    /// Runs of each measurement; each figure is their median, with the spread.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// A gateway binary to measure instead of building target/release/modelgate.
    #[arg(long)]
    gateway: Option<PathBuf>,
    /// Only these sections (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Section>,
    /// Where the report goes. Only the part between its bench markers is replaced.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/RESULTS.md"))]
    out: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the mock upstream (started by the bench itself).
    #[command(hide = true)]
    Mock,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Section {
    Stream,
    Scale,
    Invoke,
    /// `/v1/chat/completions` next to `/invoke` and `/stream`.
    Openai,
    /// The memory of 1,000 resumable streams' events held (`resume_window`).
    Resume,
    Profile,
    /// Per-key limits in Redis (loopback) next to the same limits in process.
    Redis,
}

/// Paced stream counts always measured; the most the machine holds is searched above them.
const CONCURRENT: [usize; 2] = [100, 1000];

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // One worker per core, set explicitly so that TOKIO_WORKER_THREADS (which the gateway
    // honours) shapes the gateway's runtime only.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get()))
        .enable_all()
        .build()?;
    if let Some(Command::Mock) = cli.command {
        return runtime.block_on(mock::serve());
    }
    let open_files = procs::raise_open_files_limit();
    let binary = match &cli.gateway {
        Some(binary) => binary.clone(),
        None => procs::build_gateway()?,
    };
    let sections = if cli.only.is_empty() {
        vec![
            Section::Stream,
            Section::Scale,
            Section::Invoke,
            Section::Resume,
            Section::Redis,
            Section::Openai,
            Section::Profile,
        ]
    } else {
        cli.only.clone()
    };
    let load_before = load_average();
    if load_before > 0.5 {
        eprintln!(
            "warning: the 1-minute load is {load_before:.2}: other work on this machine will show in the figures"
        );
    }
    let bench = Bench {
        binary,
        // Each idle stream holds two sockets in the gateway (client and upstream).
        idle_streams: 10_000.min((open_files.saturating_sub(100) / 2) as usize),
        report: Report::default(),
        most_streams: None,
    };
    let (report, profile, most_streams, idle_streams) =
        runtime.block_on(bench.run(&sections, cli.runs))?;
    let table = report.markdown();
    println!("\n{table}");
    let text = results_text(
        &cli,
        &table,
        profile.as_ref(),
        most_streams,
        idle_streams,
        open_files,
        load_before,
    );
    write_between_markers(&cli.out, &text)?;
    eprintln!("written to {}", cli.out.display());
    Ok(())
}

struct Bench {
    binary: PathBuf,
    idle_streams: usize,
    report: Report,
    /// The most paced streams the gateway holds on pace, found in the first run.
    most_streams: Option<usize>,
}

impl Bench {
    async fn run(
        mut self,
        sections: &[Section],
        runs: usize,
    ) -> anyhow::Result<(Report, Option<profile::Profile>, Option<usize>, usize)> {
        let mock = procs::start_mock()?;
        for run in 1..=runs {
            for section in sections {
                eprintln!("run {run}/{runs}: {section:?}");
                match section {
                    Section::Stream => self.stream(&mock).await?,
                    Section::Scale => self.scale(&mock).await?,
                    Section::Invoke => self.invoke(&mock).await?,
                    Section::Resume => self.resume(&mock).await?,
                    Section::Redis => self.limits(&mock).await?,
                    Section::Openai => {
                        let gateway = self.gateway(&mock)?;
                        openai::measure(&mut self.report, &gateway).await?
                    }
                    Section::Profile => {}
                }
            }
        }
        let valgrind = std::process::Command::new("valgrind")
            .arg("--version")
            .output()
            .is_ok_and(|output| output.status.success());
        if sections.contains(&Section::Profile) && !valgrind {
            eprintln!("profile: skipped, valgrind is missing (apt-get install valgrind)");
        }
        let profile = if sections.contains(&Section::Profile) && valgrind {
            eprintln!("profile: the gateway under callgrind");
            let profile = profile::run(&self.binary, &mock).await?;
            self.record_profile(&profile);
            Some(profile)
        } else {
            None
        };
        Ok((self.report, profile, self.most_streams, self.idle_streams))
    }

    fn gateway(&self, mock: &Process) -> anyhow::Result<Process> {
        procs::start_gateway(&self.binary, mock.addr, Wrapper::None, "")
    }

    async fn stream(&mut self, mock: &Process) -> anyhow::Result<()> {
        let gateway = self.gateway(mock)?;
        let report = &mut self.report;
        report.group("Streaming: time to first chunk, one stream at a time");
        let direct = streams::first_chunk(Transport::Direct, mock.addr, 300).await?;
        let direct_converse =
            streams::first_chunk(Transport::DirectConverse, mock.addr, 300).await?;
        for transport in [Transport::Sse, Transport::Ws, Transport::SseConverse] {
            let through = streams::first_chunk(transport, gateway.addr, 300).await?;
            // Each API against the mock's own stream of that API.
            let direct = match transport {
                Transport::SseConverse => &direct_converse,
                _ => &direct,
            };
            let name = transport.name();
            report.record(
                &format!("{name} first chunk p50"),
                "µs",
                micros(&through, 50.0),
                Some(micros(direct, 50.0)),
                Derived::Added,
                None,
            );
            report.record(
                &format!("{name} first chunk p99"),
                "µs",
                micros(&through, 99.0),
                Some(micros(direct, 99.0)),
                Derived::Added,
                Some(Goal {
                    text: "added < 200 µs",
                    on_derived: true,
                    met: |added| added < 200.0,
                }),
            );
        }
        let most = match self.most_streams {
            Some(most) => most,
            None => {
                let most = self.most_paced_streams(&gateway).await?;
                self.most_streams = Some(most);
                most
            }
        };
        let mut counts = CONCURRENT.to_vec();
        if most > counts[counts.len() - 1] {
            counts.push(most);
        }
        for n in counts {
            let direct = streams::paced(Transport::Direct, mock.addr, n, || 0.0).await?;
            for transport in [Transport::Sse, Transport::Ws] {
                let through =
                    streams::paced(transport, gateway.addr, n, || gateway.cpu_seconds()).await?;
                self.record_paced(n, transport, &through, &direct);
            }
            // ConverseStream beside InvokeModelWithResponseStream, at 100 and 1000 streams.
            if CONCURRENT.contains(&n) {
                let direct =
                    streams::paced(Transport::DirectConverse, mock.addr, n, || 0.0).await?;
                let through = streams::paced(Transport::SseConverse, gateway.addr, n, || {
                    gateway.cpu_seconds()
                })
                .await?;
                self.record_paced(n, Transport::SseConverse, &through, &direct);
            }
        }
        Ok(())
    }

    fn record_paced(
        &mut self,
        n: usize,
        transport: Transport,
        through: &streams::Paced,
        direct: &streams::Paced,
    ) {
        let report = &mut self.report;
        let name = transport.name();
        let at_1000 = n == 1000;
        report.group(&format!(
            "Streaming: {n} concurrent streams of 64 chunks, 20 ms apart"
        ));
        report.record(
            &format!("{name} per-chunk delay p50"),
            "µs",
            micros(&through.delays, 50.0),
            Some(micros(&direct.delays, 50.0)),
            Derived::Added,
            None,
        );
        report.record(
            &format!("{name} per-chunk delay p99"),
            "µs",
            micros(&through.delays, 99.0),
            Some(micros(&direct.delays, 99.0)),
            Derived::Added,
            at_1000.then_some(Goal {
                text: "added < 1000 µs",
                on_derived: true,
                met: |added| added < 1000.0,
            }),
        );
        report.record(
            &format!("{name} gateway CPU per chunk"),
            "µs",
            through.cpu * 1e6 / through.chunks_in_window.max(1) as f64,
            None,
            Derived::None,
            at_1000.then_some(Goal {
                text: "≤ 5 µs",
                on_derived: false,
                met: |cpu| cpu <= 5.0,
            }),
        );
        let rate =
            |paced: &streams::Paced| paced.chunks_in_window as f64 / paced.window.as_secs_f64();
        report.record(
            &format!("{name} chunks/s"),
            "/s",
            rate(through),
            Some(rate(direct)),
            Derived::Ratio,
            None,
        );
        report.record(
            &format!("{name} streams incomplete"),
            "",
            through.failed as f64,
            Some(direct.failed as f64),
            Derived::None,
            None,
        );
    }

    /// The most concurrent paced SSE streams the gateway keeps on pace: every stream
    /// complete and the per-chunk delay p99 under one pace period (20 ms).
    async fn most_paced_streams(&self, gateway: &Process) -> anyhow::Result<usize> {
        let cap = self.idle_streams;
        let mut most = CONCURRENT[CONCURRENT.len() - 1];
        for n in [2000, 3000, 4000, 6000, 8000, cap] {
            if n > cap || n <= most {
                continue;
            }
            let round = streams::paced(Transport::Sse, gateway.addr, n, || 0.0).await?;
            let p99 = micros(&round.delays, 99.0);
            eprintln!(
                "  {n} paced SSE streams: p99 delay {p99:.0} µs, {} incomplete",
                round.failed
            );
            if round.failed > 0 || p99 >= 20_000.0 {
                break;
            }
            most = n;
        }
        Ok(most)
    }

    async fn scale(&mut self, mock: &Process) -> anyhow::Result<()> {
        let n = self.idle_streams;
        for transport in [Transport::Sse, Transport::Ws] {
            let gateway = self.gateway(mock)?;
            let idle = streams::idle(transport, &gateway, n).await?;
            let name = transport.name();
            let report = &mut self.report;
            report.group(&format!(
                "Scale: {n} idle streams (model silent after one chunk) held 15 s"
            ));
            report.record(
                &format!("{name} streams held"),
                "",
                idle.open as f64,
                None,
                Derived::None,
                None,
            );
            report.record(
                &format!("{name} gateway RSS at rest"),
                "MiB",
                idle.rss_baseline as f64 / MIB,
                None,
                Derived::None,
                None,
            );
            report.record(
                &format!("{name} gateway RSS holding them"),
                "MiB",
                idle.rss_held as f64 / MIB,
                None,
                Derived::None,
                Some(Goal {
                    text: "< 200 MiB",
                    on_derived: false,
                    met: |rss| rss < 200.0,
                }),
            );
            report.record(
                &format!("{name} RSS per stream beyond rest"),
                "KiB",
                idle.rss_held.saturating_sub(idle.rss_baseline) as f64
                    / 1024.0
                    / idle.open.max(1) as f64,
                None,
                Derived::None,
                Some(Goal {
                    text: "≤ 10 KiB",
                    on_derived: false,
                    met: |kib| kib <= 10.0,
                }),
            );
            report.record(
                &format!("{name} gateway CPU while holding"),
                "% of a core",
                idle.cpu_share * 100.0,
                None,
                Derived::None,
                None,
            );
            report.record(
                &format!("{name} keep-alives in 15 s"),
                "",
                idle.keep_alives as f64,
                None,
                Derived::None,
                None,
            );
        }
        let gateway = procs::start_gateway(
            &self.binary,
            mock.addr,
            Wrapper::None,
            &format!("max_connections = {n}"),
        )?;
        let idle = connections::idle(&gateway, n).await?;
        let report = &mut self.report;
        report.group(&format!(
            "Scale: idle HTTP connections (one request each, then silent), max_connections = {n}"
        ));
        report.record(
            &format!("connections held of {n}"),
            "",
            idle.opened as f64,
            None,
            Derived::None,
            None,
        );
        report.record(
            "RSS per idle connection beyond rest",
            "KiB",
            idle.rss_held.saturating_sub(idle.rss_baseline) as f64
                / 1024.0
                / idle.opened.max(1) as f64,
            None,
            Derived::None,
            None,
        );
        report.record(
            &format!("connections held when {} connect", 2 * n),
            "",
            idle.held_at_cap as f64,
            None,
            Derived::None,
            None,
        );
        Ok(())
    }

    async fn resume(&mut self, mock: &Process) -> anyhow::Result<()> {
        const STREAMS: usize = 1000;
        let held = resume::buffered(&self.binary, mock, STREAMS).await?;
        let report = &mut self.report;
        report.group(&format!(
            "Resumable streams: {STREAMS} ended SSE streams of {} events each held (resume_window = \"10m\")",
            held.events_per_stream
        ));
        let beyond = held.rss_held.saturating_sub(held.rss_baseline) as f64;
        report.record(
            "gateway RSS at rest",
            "MiB",
            held.rss_baseline as f64 / MIB,
            None,
            Derived::None,
            None,
        );
        report.record(
            "gateway RSS holding them",
            "MiB",
            held.rss_held as f64 / MIB,
            None,
            Derived::None,
            None,
        );
        report.record(
            "RSS per held stream",
            "KiB",
            beyond / 1024.0 / held.streams as f64,
            None,
            Derived::None,
            None,
        );
        report.record(
            "RSS per held event",
            "B",
            beyond / (held.streams * held.events_per_stream) as f64,
            None,
            Derived::None,
            None,
        );
        Ok(())
    }

    async fn invoke(&mut self, mock: &Process) -> anyhow::Result<()> {
        let gateway = self.gateway(mock)?;
        let through = Target::Gateway(gateway.addr);
        let direct = Target::Direct(mock.addr);
        let report = &mut self.report;

        report.group("POST /invoke: one request at a time");
        let gateway_latency = invoke::one_at_a_time(through, 2000).await?;
        let direct_latency = invoke::one_at_a_time(direct, 2000).await?;
        report.record(
            "latency p50",
            "µs",
            micros(&gateway_latency, 50.0),
            Some(micros(&direct_latency, 50.0)),
            Derived::Added,
            Some(Goal {
                text: "added < 150 µs",
                on_derived: true,
                met: |added| added < 150.0,
            }),
        );
        report.record(
            "latency p99",
            "µs",
            micros(&gateway_latency, 99.0),
            Some(micros(&direct_latency, 99.0)),
            Derived::Added,
            None,
        );

        for rate in [1000, 5000] {
            const SECONDS: u64 = 5;
            let cpu_before = gateway.cpu_seconds();
            let gateway_run =
                invoke::open_loop(through, rate, Duration::from_secs(SECONDS), 64).await?;
            let cpu = gateway.cpu_seconds() - cpu_before;
            let direct_run =
                invoke::open_loop(direct, rate, Duration::from_secs(SECONDS), 64).await?;
            report.group(&format!(
                "POST /invoke: {rate} requests/s open loop for {SECONDS} s (latency from the scheduled send)"
            ));
            for (label, percentile) in [
                ("p50", 50.0),
                ("p99", 99.0),
                ("p99.9", 99.9),
                ("max", 100.0),
            ] {
                let target = (rate == 5000 && label == "p99").then_some(Goal {
                    text: "< 2000 µs",
                    on_derived: false,
                    met: |p99| p99 < 2000.0,
                });
                report.record(
                    &format!("latency {label}"),
                    "µs",
                    micros(&gateway_run.latencies, percentile),
                    Some(micros(&direct_run.latencies, percentile)),
                    Derived::Added,
                    target,
                );
            }
            report.record(
                "errors",
                "",
                gateway_run.errors as f64,
                Some(direct_run.errors as f64),
                Derived::None,
                None,
            );
            report.record(
                "gateway CPU per request",
                "µs",
                cpu * 1e6 / (rate as u64 * SECONDS) as f64,
                None,
                Derived::None,
                (rate == 5000).then_some(Goal {
                    text: "≤ 60 µs",
                    on_derived: false,
                    met: |cpu| cpu <= 60.0,
                }),
            );
        }

        let report_most = |report: &mut Report,
                           gateway_most: &invoke::Throughput,
                           direct_most: &invoke::Throughput| {
            report.group("POST /invoke: most requests/s (64 connections, closed loop)");
            report.record(
                "throughput",
                "/s",
                gateway_most.per_second,
                Some(direct_most.per_second),
                Derived::Ratio,
                Some(Goal {
                    text: "≥ 0.2× direct",
                    on_derived: true,
                    met: |ratio| ratio >= 0.2,
                }),
            );
            report.record(
                "gateway CPU per request",
                "µs",
                gateway_most.cpu_per_request * 1e6,
                None,
                Derived::None,
                None,
            );
        };
        let (warm_up, measure) = (Duration::from_secs(1), Duration::from_secs(3));
        let gateway_most =
            invoke::most(through, 64, warm_up, measure, || gateway.cpu_seconds()).await?;
        let direct_most = invoke::most(direct, 64, warm_up, measure, || 0.0).await?;
        report_most(report, &gateway_most, &direct_most);
        Ok(())
    }

    /// The same requests with no key limits, limits in process and limits in Redis.
    async fn limits(&mut self, mock: &Process) -> anyhow::Result<()> {
        let installed = std::process::Command::new("redis-server")
            .arg("--version")
            .output()
            .is_ok_and(|output| output.status.success());
        if !installed {
            eprintln!("redis: skipped, redis-server is missing (apt-get install redis-server)");
            return Ok(());
        }
        let redis = redis::start_redis()?;
        let mut figures = Vec::with_capacity(redis::Keeper::ALL.len());
        for keeper in redis::Keeper::ALL {
            figures.push((
                keeper,
                redis::measure(&self.binary, mock, &redis, keeper).await?,
            ));
        }
        let (_, none) = &figures[0];
        let report = &mut self.report;
        report.group(
            "Per-key limits, Redis on loopback: each row against the same gateway with no key limits",
        );
        for (keeper, kept) in &figures[1..] {
            let name = keeper.name();
            for (what, through, without) in [
                ("/invoke p50", &kept.invoke, &none.invoke),
                ("/invoke p99", &kept.invoke, &none.invoke),
                ("SSE first chunk p50", &kept.first_chunk, &none.first_chunk),
            ] {
                let percentile = if what.ends_with("p99") { 99.0 } else { 50.0 };
                report.record(
                    &format!("{what}, {name}"),
                    "µs",
                    micros(through, percentile),
                    Some(micros(without, percentile)),
                    Derived::Added,
                    None,
                );
            }
            report.record(
                &format!("/invoke throughput (64 connections), {name}"),
                "/s",
                kept.most.per_second,
                Some(none.most.per_second),
                Derived::Ratio,
                None,
            );
            report.record(
                &format!("gateway CPU per /invoke, {name}"),
                "µs",
                kept.most.cpu_per_request * 1e6,
                Some(none.most.cpu_per_request * 1e6),
                Derived::Added,
                None,
            );
        }
        if let Some((_, in_redis)) = figures.last() {
            report.record(
                "redis-server CPU per /invoke, limits in Redis",
                "µs",
                in_redis.redis_cpu_per_request * 1e6,
                None,
                Derived::None,
                None,
            );
        }
        Ok(())
    }

    fn record_profile(&mut self, profile: &profile::Profile) {
        let report = &mut self.report;
        report.group("Callgrind (one run; counts, not times)");
        let rows = [
            (
                "instructions per /invoke request",
                profile.per_request.instructions,
            ),
            (
                "heap allocations per /invoke request",
                profile.per_request.allocations,
            ),
            ("instructions per SSE chunk", profile.per_chunk.instructions),
            (
                "heap allocations per SSE chunk",
                profile.per_chunk.allocations,
            ),
        ];
        for (name, value) in rows {
            report.record(name, "", value, None, Derived::None, None);
        }
    }
}

const MIB: f64 = 1024.0 * 1024.0;

/// A percentile of a histogram of nanoseconds, in microseconds.
fn micros(histogram: &Histogram<u64>, percentile: f64) -> f64 {
    histogram.value_at_percentile(percentile) as f64 / 1000.0
}

fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

fn command_output(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|value| {
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kib| kib / MIB);
    format!(
        "{cpu}, {cores} cores, {memory:.0} GiB RAM, Linux {}, {}",
        command_output("uname", &["-r"]),
        command_output("rustc", &["--version"])
    )
}

fn results_text(
    cli: &Cli,
    table: &str,
    profile: Option<&profile::Profile>,
    most_streams: Option<usize>,
    idle_streams: usize,
    open_files: u64,
    load_before: f64,
) -> String {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let command = if args.is_empty() {
        "cargo run --release -p modelgate-bench".to_owned()
    } else {
        args.insert(0, "cargo run --release -p modelgate-bench --".into());
        args.join(" ")
    };
    let mut text = format!(
        "## Latest run\n\n\
         - Command: `{command}`\n\
         - Machine: {}\n\
         - Gateway: {} (commit {}); load average before/after: {load_before:.2} / {:.2}\n\
         - Each figure: median of {} runs (min–max). Gateway, mock and clients share the machine's cores.\n",
        machine(),
        cli.gateway.as_deref().map_or_else(
            || "target/release/modelgate".into(),
            |path| path.display().to_string()
        ),
        command_output("git", &["describe", "--always", "--dirty"]),
        load_average(),
        cli.runs,
    );
    if let Ok(workers) = std::env::var("TOKIO_WORKER_THREADS") {
        text.push_str(&format!(
            "- The gateway ran with TOKIO_WORKER_THREADS={workers}.\n"
        ));
    }
    if let Some(most) = most_streams {
        text.push_str(&format!(
            "- Paced SSE streams held on pace (every stream complete, p99 delay under 20 ms), searched from 2,000 up to {idle_streams}: {}.\n",
            if most > CONCURRENT[CONCURRENT.len() - 1] { most.to_string() } else { "none".into() }
        ));
    }
    text.push_str(&format!(
        "- Idle streams: {idle_streams} (each takes two sockets in the gateway; this machine's open-file limit is {open_files}).\n\n{table}"
    ));
    if let Some(profile) = profile {
        text.push_str(&format!(
            "\nTop functions by own instructions, `/invoke` batch (`callgrind_annotate --inclusive=no`):\n\n```\n{}\n```\n",
            profile.invoke_top
        ));
    }
    text
}

const BEGIN: &str = "<!-- bench:begin (written by modelgate-bench; edit outside these markers) -->";
const END: &str = "<!-- bench:end -->";

/// Replaces the text between the markers of `path`, keeping what is written around them.
fn write_between_markers(path: &Path, text: &str) -> anyhow::Result<()> {
    let existing = std::fs::read_to_string(path).unwrap_or_default();
    let block = format!("{BEGIN}\n{text}\n{END}");
    let updated = match (existing.find(BEGIN), existing.find(END)) {
        (Some(begin), Some(end)) if begin < end => format!(
            "{}{block}{}",
            &existing[..begin],
            &existing[end + END.len()..]
        ),
        _ => format!("{existing}{block}\n"),
    };
    std::fs::write(path, updated)?;
    Ok(())
}
