//! [`TestApp`]: the real `modelgate` binary on a random port, with a registry pointing at an
//! in-process Bedrock emulator, and the helpers tests use to talk to it.

use serde_json::Value;

use std::{
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

use sha2::{Digest, Sha256};

use crate::emulator::{Emulator, Scenario, StreamEnd};

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

/// How a test starts the gateway: the standard registry against the emulator, with AWS
/// credentials, unless told otherwise.
///
/// ```ignore
/// let app = TestApp::new().settings("max_messages = 3").api_key("team-a", KEY, "").spawn().await;
/// ```
pub struct TestApp<'a> {
    settings: Vec<String>,
    registry: Box<dyn FnOnce(&str) -> String + 'a>,
    api_keys: Vec<String>,
    credentials: bool,
    env: Vec<(String, String)>,
    /// Environment variables set to the emulator's URL.
    emulator_env: Vec<String>,
    nofile: Option<u64>,
    scenarios: Vec<(&'static str, Scenario)>,
    cluster: Vec<String>,
}

impl Default for TestApp<'_> {
    fn default() -> Self {
        TestApp {
            settings: Vec::new(),
            registry: Box::new(registry),
            api_keys: Vec::new(),
            credentials: true,
            env: Vec::new(),
            emulator_env: Vec::new(),
            nofile: None,
            scenarios: Vec::new(),
            cluster: Vec::new(),
        }
    }
}

impl<'a> TestApp<'a> {
    pub fn new() -> Self {
        TestApp::default()
    }

    /// Top-level settings (e.g. `max_messages = 3`), written before the registry.
    pub fn settings(mut self, lines: &str) -> Self {
        self.settings.push(lines.to_owned());
        self
    }

    /// The registry (the `[[models]]`), made from the emulator's URL, instead of [`registry`].
    pub fn registry(mut self, registry: impl FnOnce(&str) -> String + 'a) -> Self {
        self.registry = Box::new(registry);
        self
    }

    /// An `[[api_keys]]` entry: `id`, the SHA-256 of `secret`, and its `limits` (the inside
    /// of the inline table, e.g. `requests_per_minute = 2`).
    pub fn api_key(mut self, id: &str, secret: &str, limits: &str) -> Self {
        self.api_keys.push(format!(
            "[[api_keys]]\nid = \"{id}\"\nsha256 = \"{}\"\nlimits = {{ {limits} }}\n",
            sha256_hex(secret)
        ));
        self
    }

    /// No AWS credentials in the gateway's environment.
    pub fn without_credentials(mut self) -> Self {
        self.credentials = false;
        self
    }

    /// One more environment variable for the gateway.
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    /// One more environment variable for the gateway, set to the emulator's URL (e.g.
    /// `AWS_ENDPOINT_URL_STS`, for the emulator's STS).
    pub fn env_from_emulator(mut self, name: &str) -> Self {
        self.emulator_env.push(name.to_owned());
        self
    }

    /// An open-file limit, soft and hard (so the gateway cannot raise it), as on a
    /// constrained host.
    pub fn nofile(mut self, limit: u64) -> Self {
        self.nofile = Some(limit);
        self
    }

    /// What the emulator answers for `model_id` until the test scripts something else.
    pub fn scenario(mut self, model_id: &'static str, scenario: Scenario) -> Self {
        self.scenarios.push((model_id, scenario));
        self
    }

    /// `[cluster]` settings (e.g. `on_redis_error = "deny"`), written at the end of the file.
    pub fn cluster(mut self, lines: &str) -> Self {
        self.cluster.push(lines.to_owned());
        self
    }

    /// Shares the keys' limits through the Redis at `url` (`[cluster] redis_url`).
    pub fn redis(self, url: &str) -> Self {
        self.cluster(&format!("redis_url = \"{url}\""))
    }

    pub async fn spawn(self) -> App {
        let emulator = Emulator::start().await;
        for (model_id, scenario) in self.scenarios {
            emulator.script(model_id, scenario);
        }
        let mut config = self.settings.join("\n");
        config.push('\n');
        config.push_str(&(self.registry)(&emulator.url()));
        for key in &self.api_keys {
            config.push('\n');
            config.push_str(key);
        }
        if !self.cluster.is_empty() {
            config.push_str("\n[cluster]\n");
            config.push_str(&self.cluster.join("\n"));
            config.push('\n');
        }
        let file = config_file(&config);
        let mut command = gateway_command(self.credentials);
        command.envs(self.env);
        for name in &self.emulator_env {
            command.env(name, emulator.url());
        }
        if let Some(nofile) = self.nofile {
            // SAFETY: setrlimit is async-signal-safe, and nothing else runs in the child
            // between fork and exec.
            unsafe {
                command
                    .pre_exec(move || rlimit::setrlimit(rlimit::Resource::NOFILE, nofile, nofile));
            }
        }
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
                        .take_while(|c| {
                            c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '[' | ']')
                        })
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
}

pub fn sha256_hex(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
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

    /// The Prometheus text of `/metrics`, asked with `key` when keys are configured.
    pub async fn metrics(&self, key: Option<&str>) -> String {
        let request = reqwest::Client::new().get(format!("{}/metrics", self.url));
        let request = match key {
            Some(key) => request.bearer_auth(key),
            None => request,
        };
        let response = request.send().await.expect("the gateway answers");
        assert_eq!(response.status(), 200, "GET /metrics");
        response.text().await.expect("a text body")
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
