use std::{path::PathBuf, process::ExitCode, sync::Arc};

use clap::{Parser, Subcommand};
use modelgate::{
    config::Config,
    gateway::Gateway,
    server::{self, AppState, OriginPolicy},
    telemetry::{self, LogFormat},
};

// glibc's malloc took about a sixth of the gateway's instructions per request; mimalloc
// halves that and scales across threads (bench/RESULTS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Default listen address when neither flag, environment nor config names one.
const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// A streaming gateway in front of large language models.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// The model registry (TOML). Default: ./modelgate.toml, else the bundled one.
    #[arg(long, env = "MODELGATE_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Address to listen on; beats the config's `listen`. Default 127.0.0.1:8080.
    #[arg(long, env = "MODELGATE_LISTEN", global = true)]
    listen: Option<String>,
    /// Serve without API keys on a non-loopback address (anyone who reaches it can use it).
    #[arg(long)]
    insecure_no_auth: bool,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "text", env = "MODELGATE_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print the OpenAPI document (JSON) and exit.
    Openapi,
    /// Fetch the weights of the local models (all, or MODEL) into the cache and exit.
    #[cfg(feature = "local")]
    Pull {
        /// A model name from the registry.
        model: Option<String>,
    },
    /// Ask the gateway listening on --listen (on this host) for /healthz; exit 0 if it
    /// answers 200. For container health checks: the runtime image has no curl.
    Healthcheck,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Openapi) = cli.command {
        println!("{}", server::openapi_json());
        return ExitCode::SUCCESS;
    }
    if let Some(Command::Healthcheck) = cli.command {
        return healthcheck(cli.listen.as_deref().unwrap_or(DEFAULT_LISTEN));
    }
    telemetry::init(cli.log_format);
    let config = Config::load(cli.config.as_deref()).and_then(|mut config| {
        if let Ok(keys) = std::env::var("MODELGATE_API_KEYS") {
            config.add_env_keys(&keys)?;
        }
        if let Ok(url) = std::env::var("MODELGATE_REDIS_URL") {
            config.set_redis_url(&url)?;
        }
        Ok(config)
    });
    let config = match config {
        Ok(config) => config,
        Err(err) => {
            eprintln!("modelgate: invalid configuration: {err}");
            return ExitCode::from(2);
        }
    };
    #[cfg(feature = "local")]
    if let Some(Command::Pull { model }) = &cli.command {
        return match modelgate::registry::pull(&config, model.as_deref()) {
            Ok(pulled) => {
                for (name, path) in pulled {
                    println!("{name}: {}", path.display());
                }
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("modelgate: {err}");
                ExitCode::FAILURE
            }
        };
    }
    let listen = cli
        .listen
        .or_else(|| config.listen.clone())
        .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
    if config.api_keys.is_empty() {
        if !is_loopback(&listen) && !cli.insecure_no_auth {
            eprintln!(
                "modelgate: refusing to serve {listen} without API keys: anyone who reaches it could \
                 use your models. Configure keys (`[[api_keys]]` or MODELGATE_API_KEYS), listen on \
                 127.0.0.1, or pass --insecure-no-auth."
            );
            return ExitCode::from(2);
        }
        tracing::warn!(
            %listen,
            "NO API KEYS CONFIGURED: every client that reaches {listen} can use every model"
        );
    }
    // Every client connection holds a descriptor: take all the hard limit allows, so that
    // `max_connections` (derived from it) is not needlessly low.
    if let Err(err) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(error = %err, "cannot raise the open-file limit");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the Tokio runtime starts");
    runtime.block_on(async {
        tracing::info!(
            config = %config.source,
            models = config.models.len(),
            api_keys = config.api_keys.len(),
            "starting"
        );
        let gateway = match Gateway::build(&config).await {
            Ok(gateway) => Arc::new(gateway),
            Err(err) => {
                eprintln!("modelgate: invalid configuration: {err}");
                return ExitCode::from(2);
            }
        };
        let metrics = telemetry::install_metrics();
        // The gateway's own origins include the address it actually bound.
        let state = |bound| AppState {
            gateway,
            origins: OriginPolicy::new(&config.allowed_origins, &config.public_origins, bound),
            metrics,
        };
        match server::serve(&listen, &config.connections, state).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("modelgate: cannot serve on {listen}: {err}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Whether `listen` binds only loopback addresses (`127.0.0.1:…`, `[::1]:…`, `localhost:…`).
fn is_loopback(listen: &str) -> bool {
    match listen.parse::<std::net::SocketAddr>() {
        Ok(addr) => addr.ip().is_loopback(),
        Err(_) => listen
            .rsplit_once(':')
            .is_some_and(|(host, _)| host.eq_ignore_ascii_case("localhost")),
    }
}

/// `GET /healthz` on the gateway at `listen` (an unspecified address means this host's
/// loopback). A few lines of HTTP/1.1 rather than a client library in the image.
fn healthcheck(listen: &str) -> ExitCode {
    use std::{
        io::{Read, Write},
        net::{TcpStream, ToSocketAddrs},
        time::Duration,
    };
    const TIMEOUT: Duration = Duration::from_secs(3);
    let answer = (|| -> std::io::Result<String> {
        let mut address = listen
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| std::io::Error::other("the address resolves to nothing"))?;
        if address.ip().is_unspecified() {
            address.set_ip(match address {
                std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let mut stream = TcpStream::connect_timeout(&address, TIMEOUT)?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        stream.set_write_timeout(Some(TIMEOUT))?;
        write!(
            stream,
            "GET /healthz HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
        )?;
        let mut head = [0u8; 64];
        let read = stream.read(&mut head)?;
        Ok(String::from_utf8_lossy(&head[..read]).into_owned())
    })();
    match answer {
        Ok(head) if head.starts_with("HTTP/1.1 200") => ExitCode::SUCCESS,
        Ok(head) => {
            let status = head.lines().next().unwrap_or_default();
            eprintln!("modelgate healthcheck: {listen} answered {status}");
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("modelgate healthcheck: {listen}: {err}");
            ExitCode::FAILURE
        }
    }
}
