use std::{path::PathBuf, process::ExitCode, sync::Arc};

use clap::{Parser, Subcommand};
use modelgate::{
    config::Config,
    registry::Registry,
    server::{self, AppState, OriginPolicy},
    telemetry::{self, LogFormat},
};

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
    #[arg(long, env = "MODELGATE_LISTEN")]
    listen: Option<String>,
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Openapi) = cli.command {
        println!("{}", server::openapi_json());
        return ExitCode::SUCCESS;
    }
    telemetry::init(cli.log_format);
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("modelgate: invalid configuration: {err}");
            return ExitCode::from(2);
        }
    };
    let listen = cli
        .listen
        .or_else(|| config.listen.clone())
        .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the Tokio runtime starts");
    runtime.block_on(async {
        tracing::info!(config = %config.source, models = config.models.len(), "starting");
        let state = AppState {
            registry: Arc::new(Registry::build(&config).await),
            origins: OriginPolicy::new(&config.allowed_origins),
        };
        match server::serve(&listen, state).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("modelgate: cannot serve on {listen}: {err}");
                ExitCode::FAILURE
            }
        }
    })
}
