//! The parts of a multi-replica deployment, for real: a `redis-server` and an `haproxy`
//! (Debian's packages, installed by scripts/install-test-tools.sh) on free ports in
//! temporary directories, and several gateways ([`TestApp`]) sharing that Redis.

use std::{
    future::Future,
    net::TcpListener,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use tokio::process::{Child, Command};

use crate::app::{App, TestApp};

/// How long a tool may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A free port on loopback (free when asked; the tool binds it right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// Waits until `condition` holds, polling every 50 ms; panics with `what` after `within`.
pub async fn wait_until<F: Future<Output = bool>>(
    what: &str,
    within: Duration,
    mut condition: impl FnMut() -> F,
) {
    wait_for(what, within, || {
        let holds = condition();
        async move { holds.await.then_some(()) }
    })
    .await
}

/// Waits until `probe` gives something, polling every 50 ms; panics with `what` after `within`.
pub async fn wait_for<T, F: Future<Output = Option<T>>>(
    what: &str,
    within: Duration,
    mut probe: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn accepts_connections(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
}

/// A `redis-server` of its own: no persistence, so a restart starts empty.
pub struct RedisServer {
    port: u16,
    password: Option<String>,
    /// Serves TLS only, with the certificate of [`RedisServer::CA`]'s authority.
    tls: bool,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// The file, in [`RedisServer::dir`], of the authority that signed a TLS server's certificate.
    pub const CA: &str = "ca.pem";

    pub async fn start() -> RedisServer {
        RedisServer::launch(None, false).await
    }

    /// A server that requires `password` (`requirepass`).
    pub async fn with_password(password: &str) -> RedisServer {
        RedisServer::launch(Some(password.to_owned()), false).await
    }

    /// A server that speaks only TLS, with a certificate for 127.0.0.1 signed by a new
    /// authority ([`RedisServer::CA`]), and requires `password`.
    pub async fn with_tls(password: &str) -> RedisServer {
        RedisServer::launch(Some(password.to_owned()), true).await
    }

    async fn launch(password: Option<String>, tls: bool) -> RedisServer {
        let mut server = RedisServer {
            port: free_port(),
            password,
            tls,
            dir: tempfile::tempdir().expect("a temporary directory"),
            child: None,
        };
        if tls {
            make_certificates(server.dir.path());
        }
        server.run().await;
        server
    }

    /// The temporary directory the server works in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    async fn run(&mut self) {
        let mut command = Command::new("redis-server");
        command
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        if let Some(password) = &self.password {
            command.args(["--requirepass", password]);
        }
        if self.tls {
            let port = self.port.to_string();
            command.args([
                "--port",
                "0",
                "--tls-port",
                &port,
                "--tls-auth-clients",
                "no",
            ]);
            for (option, file) in [
                ("--tls-cert-file", "server.pem"),
                ("--tls-key-file", "server.key"),
                ("--tls-ca-cert-file", RedisServer::CA),
            ] {
                command.arg(option).arg(self.dir.path().join(file));
            }
        }
        self.child = Some(
            command
                .spawn()
                .expect("redis-server starts (is it installed?)"),
        );
        let port = self.port;
        wait_until("redis-server listens", START_TIMEOUT, || {
            accepts_connections(port)
        })
        .await;
    }

    /// `redis://[:password@]127.0.0.1:PORT` (`rediss://` with TLS)
    pub fn url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        match &self.password {
            Some(password) => format!("{scheme}://:{password}@127.0.0.1:{}", self.port),
            None => format!("{scheme}://127.0.0.1:{}", self.port),
        }
    }

    /// Stops the server (SIGTERM) and waits for it to exit.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGTERM);
            let _ = child.wait().await;
        }
    }

    /// Kills the server (SIGKILL), as a crash would.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing answers.
    pub fn pause(&self) {
        signal(self.child.as_ref().and_then(Child::id), libc::SIGSTOP);
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&self) {
        signal(self.child.as_ref().and_then(Child::id), libc::SIGCONT);
    }

    /// Starts it again, empty, on the same port.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.run().await;
    }
}

/// A certificate authority (`ca.pem`) and a server certificate for 127.0.0.1 it signed
/// (`server.pem`, `server.key`), made by `openssl` in `dir`.
fn make_certificates(dir: &Path) {
    std::fs::write(dir.join("san.ext"), "subjectAltName = IP:127.0.0.1\n").unwrap();
    let key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let steps: [&[&str]; 3] = [
        &[
            &["req", "-x509"],
            &key[..],
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "1",
                "-subj",
                "/CN=modelgate test CA",
            ],
        ]
        .concat(),
        &[
            &["req"],
            &key[..],
            &[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat(),
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "1",
            "-extfile",
            "san.ext",
        ],
    ];
    for args in steps {
        let output = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs (is it installed?)");
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // redis-server may run as another user than the one that made the key.
    std::fs::set_permissions(
        dir.join("server.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
}

/// Sends `signal` to a process the test started.
pub fn signal(pid: Option<u32>, signal: libc::c_int) {
    if let Some(pid) = pid {
        // SAFETY: kill(2) with a pid this test spawned and still holds.
        unsafe { libc::kill(pid as libc::pid_t, signal) };
    }
}

/// `n` gateways from the same builder, e.g. `replicas(3, || TestApp::new().redis(&url))`.
pub async fn replicas<'a>(n: usize, builder: impl Fn() -> TestApp<'a>) -> Vec<App> {
    let mut apps = Vec::with_capacity(n);
    for _ in 0..n {
        apps.push(builder().spawn().await);
    }
    apps
}

/// An `haproxy` in round robin in front of the given gateways; each answer names the
/// replica that served it in `x-replica` (`r0`, `r1`, …).
pub struct Balancer {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    _child: Child,
    _dir: tempfile::TempDir,
}

impl Balancer {
    pub async fn start(backends: &[App]) -> Balancer {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let port = free_port();
        let servers: String = backends
            .iter()
            .enumerate()
            .map(|(index, app)| {
                let address = app.url.trim_start_matches("http://");
                format!("    server r{index} {address}\n")
            })
            .collect();
        let config = format!(
            "global\n    maxconn 1024\n\
             defaults\n    mode http\n    timeout connect 2s\n    timeout client 120s\n    timeout server 120s\n\
             frontend gateways\n    bind 127.0.0.1:{port}\n    default_backend replicas\n\
             backend replicas\n    balance roundrobin\n    http-response set-header x-replica %[srv_name]\n{servers}"
        );
        let file = dir.path().join("haproxy.cfg");
        std::fs::write(&file, config).expect("haproxy.cfg is written");
        let child = haproxy(&file);
        wait_until("haproxy listens", START_TIMEOUT, || {
            accepts_connections(port)
        })
        .await;
        Balancer {
            url: format!("http://127.0.0.1:{port}"),
            _child: child,
            _dir: dir,
        }
    }
}

fn haproxy(config: &Path) -> Child {
    Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("haproxy starts (is it installed?)")
}

/// Waits until the gateway at `url` reports Redis `state` in `/healthz`.
pub async fn wait_for_redis(url: &str, state: &str) {
    wait_until(
        &format!("/healthz says redis {state}"),
        START_TIMEOUT,
        || async { health(url).await.1["redis"] == state },
    )
    .await;
}

/// What `/healthz` at `url` says.
pub async fn health(url: &str) -> (u16, serde_json::Value, Option<String>) {
    let response = reqwest::get(format!("{url}/healthz"))
        .await
        .expect("/healthz answers");
    let status = response.status().as_u16();
    let replica = response
        .headers()
        .get("x-replica")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    (status, response.json().await.expect("a JSON body"), replica)
}

#[tokio::test]
#[ignore = "needs redis-server and haproxy: run scripts/install-test-tools.sh"]
async fn replicas_behind_haproxy_share_one_redis_and_report_it_in_healthz() {
    let redis = RedisServer::start().await;
    let apps = replicas(2, || TestApp::new().redis(&redis.url())).await;
    for app in &apps {
        wait_for_redis(&app.url, "ok").await;
    }
    let balancer = Balancer::start(&apps).await;
    let mut served_by = Vec::new();
    for _ in 0..4 {
        let (status, body, replica) = health(&balancer.url).await;
        assert_eq!(status, 200);
        assert_eq!(body, serde_json::json!({"status": "ok", "redis": "ok"}));
        served_by.push(replica.expect("haproxy names the replica"));
    }
    assert_eq!(served_by, ["r0", "r1", "r0", "r1"], "round robin");
    let (_, alone, _) = health(&TestApp::new().spawn().await.url).await;
    assert_eq!(
        alone,
        serde_json::json!({"status": "ok"}),
        "no Redis, no field"
    );
}

#[tokio::test]
#[ignore = "needs redis-server and haproxy: run scripts/install-test-tools.sh"]
async fn a_redis_crash_and_restart_is_recovered_without_restarting_and_the_password_is_never_logged()
 {
    const PASSWORD: &str = "hunter2-redis-secret";
    let mut redis = RedisServer::with_password(PASSWORD).await;
    let app = TestApp::new().redis(&redis.url()).spawn().await;
    wait_for_redis(&app.url, "ok").await;

    redis.kill().await;
    wait_for_redis(&app.url, "unreachable").await;
    assert_eq!(
        health(&app.url).await.0,
        200,
        "on_redis_error = allow: still serving"
    );
    redis.restart().await;
    wait_for_redis(&app.url, "ok").await;

    let logs = app.logs();
    assert!(!logs.contains(PASSWORD), "{logs}");
    assert!(logs.contains(":***@127.0.0.1"), "the redacted URL: {logs}");
    assert!(logs.contains("REDIS UNREACHABLE"), "{logs}");
}

#[tokio::test]
#[ignore = "needs redis-server and haproxy: run scripts/install-test-tools.sh"]
async fn a_rediss_url_with_a_password_reaches_redis_over_tls_trusting_the_systems_authorities() {
    const PASSWORD: &str = "tls-redis-secret";
    let redis = RedisServer::with_tls(PASSWORD).await;
    // The system's trust store is where rustls-native-certs looks: here, our authority.
    let ca = redis.dir().join(RedisServer::CA);
    let app = TestApp::new()
        .env("MODELGATE_REDIS_URL", &redis.url())
        .env("SSL_CERT_FILE", ca.to_str().unwrap())
        .spawn()
        .await;
    wait_for_redis(&app.url, "ok").await;
    let untrusting = TestApp::new()
        .env("MODELGATE_REDIS_URL", &redis.url())
        .spawn()
        .await;
    wait_until("the first ping fails", START_TIMEOUT, || async {
        untrusting.logs().contains("REDIS UNREACHABLE")
    })
    .await;
    assert_eq!(
        health(&untrusting.url).await.1["redis"],
        "unreachable",
        "a certificate no trusted authority signed is refused"
    );
    assert!(!app.logs().contains(PASSWORD) && !untrusting.logs().contains(PASSWORD));
}
