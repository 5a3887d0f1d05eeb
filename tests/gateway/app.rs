//! `spawn_app`: the real `modelgate` binary on a random port, with a registry pointing at an
//! in-process Bedrock emulator, and the helpers tests use to talk to it.

use std::{
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use eventsource_stream::Eventsource;
use futures_util::{Stream, StreamExt};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

use crate::emulator::{Emulator, StreamEnd};

pub const LLAMA_ID: &str = "meta.llama3-70b-instruct-v1:0";
pub const CLAUDE_ID: &str = "anthropic.claude-3-haiku-20240307-v1:0";
/// The access key the gateway is given; the emulator sees it in the SigV4 credential scope.
pub const ACCESS_KEY: &str = "AKIDMODELGATETEST";
pub const SECRET_KEY: &str = "modelgate-test-secret-never-logged";

pub struct App {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    pub emulator: Emulator,
    logs: Arc<Mutex<Vec<String>>>,
    child: Child,
    _config: tempfile::NamedTempFile,
}

/// The registry every test starts from: both native formats, against the emulator.
pub fn registry(emulator_url: &str) -> String {
    format!(
        r#"
[[models]]
name = "llama3"
provider = "bedrock"
model_id = "{LLAMA_ID}"
format = "llama3"
region = "us-east-1"
endpoint_url = "{emulator_url}"
max_tokens = 512
max_tokens_limit = 2048
temperature = 0.5

[[models]]
name = "anthropic"
provider = "bedrock"
model_id = "{CLAUDE_ID}"
format = "anthropic"
region = "us-east-1"
endpoint_url = "{emulator_url}"
"#
    )
}

pub async fn spawn_app() -> App {
    spawn_app_with(registry, true).await
}

/// Starts the gateway with top-level `settings` (e.g. `max_messages = 3`) before the
/// standard registry.
pub async fn spawn_app_with_settings(settings: &str) -> App {
    spawn_app_with(|url| format!("{settings}\n{}", registry(url)), true).await
}

/// Starts the gateway with the registry `config(emulator_url)`, with or without AWS
/// credentials in its environment.
pub async fn spawn_app_with(config: impl FnOnce(&str) -> String, credentials: bool) -> App {
    spawn_app_env(config, credentials, &[]).await
}

/// Like [`spawn_app_with`], with more environment variables.
pub async fn spawn_app_env(
    config: impl FnOnce(&str) -> String,
    credentials: bool,
    env: &[(&str, &str)],
) -> App {
    spawn(config, credentials, |command| {
        command.envs(env.iter().copied());
    })
    .await
}

/// Starts the gateway with top-level `settings` and an open-file limit of `nofile`, soft and
/// hard (so the gateway cannot raise it), as on a constrained host.
pub async fn spawn_app_with_nofile(settings: &str, nofile: u64) -> App {
    spawn(
        |url| format!("{settings}\n{}", registry(url)),
        true,
        |command| {
            // SAFETY: setrlimit is async-signal-safe, and nothing else runs in the child
            // between fork and exec.
            unsafe {
                command
                    .pre_exec(move || rlimit::setrlimit(rlimit::Resource::NOFILE, nofile, nofile));
            }
        },
    )
    .await
}

async fn spawn(
    config: impl FnOnce(&str) -> String,
    credentials: bool,
    customize: impl FnOnce(&mut Command),
) -> App {
    let emulator = Emulator::start().await;
    let file = config_file(&config(&emulator.url()));
    let mut command = gateway_command(credentials);
    customize(&mut command);
    command
        .arg("--config")
        .arg(file.path())
        .arg("--listen")
        .arg("127.0.0.1:0")
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("the modelgate binary starts");
    let logs = Arc::new(Mutex::new(Vec::new()));
    let (address_tx, address_rx) = tokio::sync::oneshot::channel();
    let stderr = child.stderr.take().expect("stderr is piped");
    let collected = logs.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        let mut address_tx = Some(address_tx);
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some((_, rest)) = line.split_once("listening on http://")
                && let Some(tx) = address_tx.take()
            {
                // The address ends where the text or JSON log line goes on.
                let address: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '[' | ']'))
                    .collect();
                let _ = tx.send(format!("http://{address}"));
            }
            collected.lock().unwrap().push(line);
        }
    });
    let url = tokio::time::timeout(Duration::from_secs(20), address_rx)
        .await
        .unwrap_or_else(|_| panic!("modelgate did not start: {:?}", logs.lock().unwrap()))
        .unwrap_or_else(|_| panic!("modelgate exited: {:?}", logs.lock().unwrap()));
    App {
        url,
        emulator,
        logs,
        child,
        _config: file,
    }
}

pub fn config_file(text: &str) -> tempfile::NamedTempFile {
    let file = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("a temporary file");
    std::fs::write(file.path(), text).expect("the config is written");
    file
}

/// The gateway binary with a clean, hermetic AWS environment: nothing from the developer's
/// machine (profiles, Bedrock API keys, endpoint overrides) and never the EC2 metadata service.
pub fn gateway_command(credentials: bool) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_modelgate"));
    for (name, _) in std::env::vars() {
        if name.starts_with("AWS_") || name.starts_with("MODELGATE_") {
            command.env_remove(name);
        }
    }
    command
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/nonexistent/modelgate-test")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/modelgate-test")
        .env("RUST_LOG", "info")
        .kill_on_drop(true);
    if credentials {
        command
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
    }
    command
}

impl App {
    pub fn ws_url(&self, query: &str) -> String {
        format!(
            "{}/ws/model?{query}",
            self.url.replacen("http://", "ws://", 1)
        )
    }

    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        reqwest::Client::new()
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .await
            .expect("the gateway answers")
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        reqwest::get(format!("{}{path}", self.url))
            .await
            .expect("the gateway answers")
    }

    /// The gateway's process id, to watch its memory.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the gateway is running")
    }

    /// Sends SIGTERM, as a service manager or orchestrator would.
    pub fn terminate(&self) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Waits for the gateway to exit and returns its exit code.
    pub async fn exit_code(&mut self, within: Duration) -> Option<i32> {
        tokio::time::timeout(within, self.child.wait())
            .await
            .expect("the gateway exits in time")
            .expect("the exit status")
            .code()
    }

    /// Resident memory of the gateway process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// CPU time (user and system) the gateway process has used so far.
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // SAFETY: sysconf only reads a constant of the system.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        Duration::from_millis(ticks * 1000 / per_second)
    }

    /// Asserts that the one upstream stream the test opened was closed by the gateway
    /// (the client side of it went away) within a second.
    pub async fn assert_upstream_closed_within_a_second(&self) {
        let ends = self
            .emulator
            .wait_streams_ended(1, Duration::from_secs(1))
            .await;
        assert!(
            matches!(ends[0], StreamEnd::ClientClosed { .. }),
            "{ends:?}"
        );
        assert_eq!(self.emulator.open_streams(), 0);
    }

    /// Everything the gateway has logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }
}

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq)]
pub struct Sse {
    pub event: String,
    pub data: Value,
}

/// The events of an SSE response, as a browser's EventSource would see them.
pub fn sse_events(response: reqwest::Response) -> impl Stream<Item = Sse> + Unpin {
    response
        .bytes_stream()
        .eventsource()
        .map(|event| {
            let event = event.expect("a well-formed event stream");
            Sse {
                data: serde_json::from_str(&event.data).expect("event data is JSON"),
                event: event.event,
            }
        })
        .boxed()
}

/// All events until the stream ends.
pub async fn all_sse_events(response: reqwest::Response) -> Vec<Sse> {
    tokio::time::timeout(Duration::from_secs(20), sse_events(response).collect())
        .await
        .expect("the stream ends")
}

/// Asserts the status and the error code of a JSON error response and returns its message.
pub async fn expect_error(response: reqwest::Response, status: u16, code: &str) -> String {
    assert_eq!(
        response.status().as_u16(),
        status,
        "status of {}",
        response.url()
    );
    let body: Value = response.json().await.expect("a JSON error body");
    assert_eq!(body["error"]["code"], code, "{body}");
    body["error"]["message"]
        .as_str()
        .expect("an error message")
        .to_owned()
}
