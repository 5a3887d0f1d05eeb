//! What the container image encodes, proven outside a container (images cannot be built
//! here): the Dockerfile's start-up command, environment, user, volumes and health check,
//! read from the Dockerfile itself and run as they are, with each volume a temporary
//! directory and the port a free one; and the compose stack's HAProxy configuration.

use std::{os::unix::fs::PermissionsExt, path::Path, process::Stdio, time::Duration};

use serde_json::Value;

use crate::app::{gateway_command, registry, sha256_hex};
use crate::cluster::{free_port, wait_until};
use crate::emulator::Emulator;

const KEY: &str = "mg-container-key-0123456789";

/// The instructions of the Dockerfile's last stage (the runtime image), continuation lines
/// joined.
struct RuntimeStage {
    env: Vec<(String, String)>,
    volumes: Vec<String>,
    user: String,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    healthcheck: Vec<String>,
}

fn runtime_stage() -> RuntimeStage {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile"))
        .expect("the Dockerfile");
    let joined = text.replace("\\\n", " ");
    let instructions: Vec<&str> = joined
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect();
    let last_from = instructions
        .iter()
        .rposition(|line| line.starts_with("FROM "))
        .expect("a FROM");
    let mut stage = RuntimeStage {
        env: Vec::new(),
        volumes: Vec::new(),
        user: String::new(),
        entrypoint: Vec::new(),
        cmd: Vec::new(),
        healthcheck: Vec::new(),
    };
    let exec_form = |rest: &str| -> Vec<String> {
        serde_json::from_str(rest.trim()).expect("an instruction in exec (JSON) form")
    };
    for line in &instructions[last_from..] {
        let (instruction, rest) = line.split_once(' ').unwrap_or((line, ""));
        match instruction {
            "ENV" => stage.env.extend(rest.split_whitespace().map(|pair| {
                let (name, value) = pair.split_once('=').expect("ENV name=value");
                (name.to_owned(), value.to_owned())
            })),
            "VOLUME" => stage.volumes = exec_form(rest),
            "USER" => stage.user = rest.trim().to_owned(),
            "ENTRYPOINT" => stage.entrypoint = exec_form(rest),
            "CMD" => stage.cmd = exec_form(rest),
            "HEALTHCHECK" => {
                let (_, command) = rest.split_once(" CMD ").expect("HEALTHCHECK ... CMD [...]");
                stage.healthcheck = exec_form(command);
            }
            _ => {}
        }
    }
    stage
}

/// Maps the image's paths and port onto this machine: a volume's path into its temporary
/// directory, port 8080 onto a free one.
struct Host<'a> {
    root: &'a Path,
    volumes: &'a [String],
    port: u16,
}

impl Host<'_> {
    fn map(&self, value: &str) -> String {
        let value = value.replace(":8080", &format!(":{}", self.port));
        match self
            .volumes
            .iter()
            .find(|volume| value.starts_with(volume.as_str()))
        {
            Some(_) => format!("{}{value}", self.root.display()),
            None => value,
        }
    }

    /// The image's command line and environment, as a process here; the binary is ours.
    fn command(
        &self,
        argv: &[String],
        env: &[(String, String)],
        uid: Option<u32>,
    ) -> tokio::process::Command {
        assert_eq!(argv[0], "modelgate", "the image's binary is on its PATH");
        let mut command = gateway_command(true);
        command
            .args(argv[1..].iter().map(|arg| self.map(arg)))
            .envs(env.iter().map(|(name, value)| (name, self.map(value))));
        if let Some(uid) = uid {
            command.uid(uid).gid(uid);
        }
        command
    }
}

#[tokio::test]
async fn the_image_starts_as_its_dockerfile_says_as_a_non_root_user_with_its_volumes_and_health_check()
 {
    let stage = runtime_stage();
    let uid: u32 = stage
        .user
        .split(':')
        .next()
        .and_then(|uid| uid.parse().ok())
        .expect("USER is numeric (Kubernetes' runAsNonRoot checks it)");
    assert_ne!(uid, 0, "the image does not run as root");
    let env_value = |name: &str| {
        stage
            .env
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.clone())
            .unwrap_or_else(|| panic!("ENV {name}"))
    };
    let config_path = env_value("MODELGATE_CONFIG");
    let in_a_volume = |path: &str| stage.volumes.iter().any(|volume| path.starts_with(volume));
    assert!(in_a_volume(&config_path), "the config is in a volume");
    assert!(
        in_a_volume(&env_value("MODELGATE_CACHE")),
        "the model cache is in a volume"
    );
    let mut argv = stage.entrypoint.clone();
    argv.extend(stage.cmd.iter().cloned());
    let config_flag = argv
        .iter()
        .position(|arg| arg == "--config")
        .expect("--config");
    assert_eq!(argv[config_flag + 1], config_path);

    // The volumes, as the image's user owns them; the registry points at the emulator.
    let root = tempfile::tempdir().unwrap();
    let host = Host {
        root: root.path(),
        volumes: &stage.volumes,
        port: free_port(),
    };
    let emulator = Emulator::start().await;
    // SAFETY: geteuid only reads the process's credentials.
    let running_as_root = unsafe { libc::geteuid() } == 0;
    for volume in &stage.volumes {
        let dir = host.map(volume);
        std::fs::create_dir_all(&dir).unwrap();
        if running_as_root {
            std::os::unix::fs::chown(&dir, Some(uid), Some(uid)).unwrap();
        }
    }
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(
        host.map(&config_path),
        format!(
            "{}\n[[api_keys]]\nid = \"team\"\nsha256 = \"{}\"\n",
            registry(&emulator.url()),
            sha256_hex(KEY)
        ),
    )
    .unwrap();
    // As the image's user when the test may switch to it; else as itself, not root either.
    let run_as = running_as_root.then_some(uid);

    let mut gateway = host
        .command(&argv, &stage.env, run_as)
        .env("MODELGATE_API_KEYS", format!("ops:{KEY}-ops"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the gateway starts");
    let healthcheck = || async {
        host.command(&stage.healthcheck, &stage.env, run_as)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .expect("the health check runs")
            .success()
    };
    wait_until(
        "the HEALTHCHECK passes",
        Duration::from_secs(20),
        healthcheck,
    )
    .await;

    let pid = gateway.id().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let real_uid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().next())
        .unwrap();
    if running_as_root {
        assert_eq!(real_uid, uid.to_string(), "runs as USER");
    }
    let models: Value = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/models", host.port))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        models["models"][0]["name"], "llama3",
        "the registry from the config volume: {models}"
    );

    crate::cluster::signal(Some(pid), libc::SIGTERM);
    gateway.wait().await.unwrap();
    assert!(!healthcheck().await, "nothing answers: unhealthy");
}

#[tokio::test]
#[ignore = "needs redis-server and haproxy: run scripts/install-test-tools.sh"]
async fn the_compose_stack_balances_its_own_replicas_and_mounts_the_images_volumes() {
    let root = env!("CARGO_MANIFEST_DIR");
    let haproxy_cfg = format!("{root}/deploy/haproxy.cfg");
    let output = tokio::process::Command::new("haproxy")
        .args(["-c", "-f", &haproxy_cfg])
        .output()
        .await
        .expect("haproxy runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let compose = std::fs::read_to_string(format!("{root}/compose.yaml")).unwrap();
    let servers: Vec<String> = std::fs::read_to_string(&haproxy_cfg)
        .unwrap()
        .lines()
        .filter_map(|line| line.trim().strip_prefix("server "))
        .map(|server| server.split_whitespace().nth(1).unwrap().to_owned())
        .collect();
    assert_eq!(servers.len(), 2, "two replicas: {servers:?}");
    for server in &servers {
        let (service, port) = server.split_once(':').unwrap();
        assert!(
            compose.contains(&format!("\n  {service}: ")),
            "service {service}"
        );
        assert_eq!(port, "8080", "the image's port");
    }
    let stage = runtime_stage();
    let config = stage
        .env
        .iter()
        .find(|(name, _)| name == "MODELGATE_CONFIG")
        .map(|(_, path)| path.as_str())
        .unwrap();
    assert!(
        compose.contains(&format!(":{config}:ro")),
        "the config is mounted where the image reads it"
    );
    for volume in &stage.volumes {
        assert!(
            compose.contains(&format!(":{volume}")),
            "{volume} is mounted"
        );
    }
}
