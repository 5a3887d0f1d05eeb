//! The processes under test: the mock upstream and the release gateway, started fresh for
//! each measurement, and what the kernel says about them.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::mock::Scenario;

/// Every scenario the gateway's registry names (model name = scenario name).
pub const SCENARIOS: &[Scenario] = &[
    Scenario::Paced {
        chunks: 1,
        pace: Duration::ZERO,
    },
    Scenario::Paced {
        chunks: 2,
        pace: Duration::ZERO,
    },
    Scenario::Paced {
        chunks: 65,
        pace: Duration::ZERO,
    },
    Scenario::Paced {
        chunks: 64,
        pace: Duration::from_millis(20),
    },
    crate::resume::LONG,
    Scenario::Silent,
];

/// The model `/invoke` is measured with.
pub const INVOKE_MODEL: &str = "bench";

/// A child process killed when dropped.
pub struct Process {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// User + system CPU time the process has used so far, in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.pid())
    }

    /// Resident memory, in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| {
                value
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map_or(0, |kib| kib * 1024)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at field 3; utime and
    // stime are fields 14 and 15, in clock ticks.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |index: usize| {
        fields
            .get(index)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) as f64 / per_second
}

/// Starts the mock (this binary, `mock` subcommand) and waits for its port.
pub fn start_mock() -> anyhow::Result<Process> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg("mock")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the mock")?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let port: u16 = line
        .trim()
        .strip_prefix("listening ")
        .and_then(|port| port.parse().ok())
        .with_context(|| format!("the mock said {line:?}"))?;
    Ok(Process {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
    })
}

/// How the gateway is run.
pub enum Wrapper<'a> {
    None,
    /// Under `valgrind --tool=callgrind`, writing its profile to this file.
    Callgrind(&'a Path),
}

/// Starts the gateway binary with a registry whose models all point at `mock`, with dummy
/// AWS credentials and nothing else from the AWS environment, logging as it would in
/// production (default level) to a file, with top-level `settings` added to the registry.
/// Returns once `/healthz` answers.
pub fn start_gateway(
    binary: &Path,
    mock: SocketAddr,
    wrapper: Wrapper,
    settings: &str,
) -> anyhow::Result<Process> {
    start_gateway_with_env(binary, mock, wrapper, settings, &[])
}

/// [`start_gateway`], with these `MODELGATE_…` variables in its environment.
pub fn start_gateway_with_env(
    binary: &Path,
    mock: SocketAddr,
    wrapper: Wrapper,
    settings: &str,
    env: &[(&str, &str)],
) -> anyhow::Result<Process> {
    let dir = std::env::temp_dir().join(format!("modelgate-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("registry.toml");
    std::fs::write(&config, format!("{settings}\n{}", registry(mock)))?;
    let addr = free_port()?;
    let log = std::fs::File::create(dir.join("gateway.log"))?;
    let mut command = match wrapper {
        Wrapper::None => Command::new(binary),
        Wrapper::Callgrind(out) => {
            let mut command = Command::new("valgrind");
            command
                .arg("--tool=callgrind")
                .arg(format!("--callgrind-out-file={}", out.display()))
                .arg(binary);
            command
        }
    };
    for (name, _) in std::env::vars() {
        if name.starts_with("AWS_") || name.starts_with("MODELGATE_") || name == "RUST_LOG" {
            command.env_remove(name);
        }
    }
    let child = command
        .arg("--config")
        .arg(&config)
        .arg("--listen")
        .arg(addr.to_string())
        .env("AWS_ACCESS_KEY_ID", "AKIDMODELGATEBENCH")
        .env("AWS_SECRET_ACCESS_KEY", "modelgate-bench-secret")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/nonexistent/modelgate-bench")
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/modelgate-bench",
        )
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let process = Process { child, addr };
    let started = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the gateway did not listen on {addr} within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(process)
}

fn registry(mock: SocketAddr) -> String {
    let model = |name: &str, model_id: &str, format: &str| {
        format!(
            "[[models]]\nname = \"{name}\"\nprovider = \"bedrock\"\nmodel_id = \"{model_id}\"\n\
             format = \"{format}\"\nregion = \"us-east-1\"\nendpoint_url = \"http://{mock}\"\n\n"
        )
    };
    // The production caps on calls in flight (512 and 128) would refuse most of the bench's
    // streams, and the idle streams stay silent for longer than the default idle timeout.
    let mut text = "max_concurrent_upstream = 1000000\n\n[upstream]\nmax_concurrent = 1000000\n\
                    idle_timeout = \"10m\"\n\n"
        .to_owned();
    text.push_str(&model(INVOKE_MODEL, "meta.llama3-bench-invoke", "llama3"));
    for scenario in SCENARIOS {
        text.push_str(&model(&scenario.name(), &scenario.model_id(), "llama3"));
        // The same answer through ConverseStream.
        text.push_str(&model(
            &crate::streams::converse_model(*scenario),
            &scenario.model_id(),
            "converse",
        ));
    }
    text
}

pub fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Builds the release gateway and returns the path of its binary.
pub fn build_gateway() -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("building the release gateway: cargo build --release -p modelgate --bin modelgate");
    let output = Command::new(cargo)
        .args([
            "build",
            "--release",
            "-p",
            "modelgate",
            "--bin",
            "modelgate",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo")?;
    if !output.status.success() {
        bail!("cargo build --release failed");
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["target"]["name"] == "modelgate")
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
        .context("cargo did not name the modelgate executable")
}

/// Raises this process's open-file limit to its hard limit (children inherit it) and
/// returns it: 10,000 streams through the gateway need 20,000 sockets in the gateway.
pub fn raise_open_files_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit for both calls.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    limit.rlim_cur
}
