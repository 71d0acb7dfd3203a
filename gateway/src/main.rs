//! `tiergate`: the command line.
//!
//! - `tiergate [serve]`: run the server (the default).
//! - `tiergate migrate`: apply database migrations and exit.
//! - `tiergate healthcheck`: probe the local `/livez` (or a URL); exit 0 or 1.
//! - `tiergate config check [FILE]` / `config print`: validate, or show the effective
//!   settings with secrets redacted (a redacted secret fails `config check` until the real
//!   one is supplied).
//! - `tiergate split show|set|reset`, `tiergate fleet`: the fleet's runtime splits and
//!   live tasks, straight on PostgreSQL and Redis (docs/fleet.md).
//! - `tiergate completions SHELL` / `tiergate man`: shell completions and the man page.
//!
//! Invalid configuration exits with 78 (`EX_CONFIG`) after listing every problem, so a
//! deployment circuit breaker trips at once instead of crash-looping.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use clap_complete::Shell;
use gateway::shutdown::Signals;
use tiergate_config::{ConfigError, LogFormat, ProcessEnv, Settings};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "tiergate",
    version = build_info::LONG_VERSION,
    about = "The application tier in one binary."
)]
struct Cli {
    /// TOML settings file (defaults < file < environment).
    #[arg(long, global = true, env = "TIERGATE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve HTTP (the default).
    Serve,
    /// Apply pending database migrations, then exit.
    Migrate {
        /// Give up when the database is still unreachable after this long.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Probe the local admin `/livez` (or --url) and exit 0 on a 2xx answer, else 1: the
    /// container health check for images without curl.
    Healthcheck {
        /// URL to probe instead, plain http:// (e.g. http://127.0.0.1:9090/readyz).
        #[arg(long, value_name = "URL")]
        url: Option<String>,
        /// Give up after this long.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Inspect the configuration.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Print a completion script for SHELL to standard output.
    Completions {
        /// The shell to complete in.
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Print the man page (roff) to standard output: `tiergate man > tiergate.1`.
    Man,
    /// Show or change a route's split for the whole fleet, with or without a running task.
    Split {
        #[command(subcommand)]
        action: SplitAction,
    },
    /// List the live tasks: id, version, colour, applied revision, uptime, in flight.
    Fleet,
    /// Move ROUTE to a group step by step, rolling back on a breach; or `rollout status
    /// ROUTE`, `rollout abort ROUTE`.
    #[command(args_conflicts_with_subcommands = true)]
    Rollout {
        #[command(subcommand)]
        action: Option<RolloutAction>,
        /// The split route.
        route: Option<String>,
        /// The group to move the traffic to.
        #[arg(long, value_name = "GROUP")]
        to: Option<String>,
        /// Percent to the group at each step: each once, 100 among them, run rising.
        #[arg(long, value_delimiter = ',', default_value = "5,25,50,100")]
        steps: Vec<i32>,
        /// How long each step runs before the next.
        #[arg(long, default_value = "30s")]
        interval: String,
        /// Largest share of 5xx answers from the group in a step.
        #[arg(long, default_value = "1%")]
        max_error_rate: String,
        /// Largest p99 latency of the group in a step.
        #[arg(long, default_value = "500ms")]
        max_p99: String,
    },
}

#[derive(Debug, Subcommand)]
enum RolloutAction {
    /// The route's latest rollouts, newest first.
    Status { route: String },
    /// Stop the rollout running on ROUTE and send it all back to the previous group.
    Abort { route: String },
}

#[derive(Debug, Subcommand)]
enum SplitAction {
    /// The file weights, runtime split and weights in force of each split route.
    Show {
        /// Only this route.
        route: Option<String>,
    },
    /// Give ROUTE a runtime split, fleet-wide: `split set web blue=0 green=100`.
    Set {
        route: String,
        /// GROUP=WEIGHT, one per group (groups not named get 0).
        #[arg(required = true, value_name = "GROUP=WEIGHT")]
        weights: Vec<String>,
        /// Wait until every live task has applied it; exit 1 naming those that had not.
        #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
        wait: Option<Duration>,
    },
    /// Return ROUTE to the file's weights, fleet-wide.
    Reset {
        route: String,
        /// Wait until every live task has applied it; exit 1 naming those that had not.
        #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
        wait: Option<Duration>,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigAction {
    /// Validate, listing every problem (exit 78 when invalid), and load the TLS
    /// certificates when `listen.https` is set.
    Check {
        /// The settings file to check instead of --config; `-` reads standard input
        /// (`tiergate config print | tiergate config check -`).
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
    },
    /// Print the effective settings as TOML, secrets redacted: `config check` refuses a
    /// redacted secret until the real one is supplied.
    Print,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = cli.config.as_deref();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => with_settings(config, |s| run_async(s, |s| serve(s, cli.config.clone()))),
        Command::Migrate { timeout } => {
            with_settings(config, |s| run_async(s, |s| migrate(s, timeout)))
        }
        Command::Healthcheck { url, timeout } => healthcheck(config, url, timeout),
        Command::Config {
            action: ConfigAction::Check { file },
        } => config_check(config, file.as_deref()),
        Command::Config {
            action: ConfigAction::Print,
        } => with_settings(config, |settings| {
            write_stdout(format!("{PRINT_HEADER}{}", settings.to_redacted_toml()).as_bytes())
        }),
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "tiergate", &mut script);
            write_stdout(&script)
        }
        Command::Man => {
            let mut page = Vec::new();
            match clap_mangen::Man::new(Cli::command()).render(&mut page) {
                Ok(()) => write_stdout(&page),
                Err(error) => {
                    eprintln!("tiergate: cannot render the man page: {error}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Split { action } => {
            with_settings(config, |s| control(s, Fleetwide::Split(action)))
        }
        Command::Fleet => with_settings(config, |s| control(s, Fleetwide::Tasks)),
        Command::Rollout {
            action: Some(RolloutAction::Status { route }),
            ..
        } => with_settings(config, |s| control(s, Fleetwide::RolloutStatus(route))),
        Command::Rollout {
            action: Some(RolloutAction::Abort { route }),
            ..
        } => with_settings(config, |s| control(s, Fleetwide::RolloutAbort(route))),
        Command::Rollout {
            action: None,
            route,
            to,
            steps,
            interval,
            max_error_rate,
            max_p99,
        } => {
            let (Some(route), Some(to)) = (route, to) else {
                eprintln!(
                    "tiergate: rollout needs ROUTE and --to GROUP (or: rollout status ROUTE)"
                );
                return ExitCode::from(2);
            };
            let ask = gateway::control::RolloutAsk {
                route,
                to,
                steps,
                interval,
                max_error_rate,
                max_p99,
            };
            with_settings(config, |s| control(s, Fleetwide::Rollout(ask)))
        }
    }
}

/// What `config print` writes above the settings.
const PRINT_HEADER: &str = "\
# The effective settings (tiergate config print). Secrets are redacted (`***`,
# `[redacted]`): `tiergate config check` refuses them until the real ones are supplied,
# through the environment or in place.
";

/// Runs `then` with the settings, or exits 78 listing every problem.
fn with_settings(config: Option<&Path>, then: impl FnOnce(&Settings) -> ExitCode) -> ExitCode {
    match tiergate_config::load(config, &ProcessEnv) {
        Ok(settings) => then(&settings),
        Err(error) => config_failed(&error),
    }
}

fn config_failed(error: &ConfigError) -> ExitCode {
    eprintln!("tiergate: {error}");
    ExitCode::from(ConfigError::EXIT_CODE)
}

/// `config check [FILE]`: the settings from FILE (`-`: standard input) or `--config`, and
/// the certificate files too, so a deployment with a bad one fails here, not when the task
/// starts.
fn config_check(config: Option<&Path>, file: Option<&Path>) -> ExitCode {
    let loaded = match file {
        Some(path) if path == Path::new("-") => {
            let mut text = String::new();
            match std::io::stdin().read_to_string(&mut text) {
                Ok(_) => tiergate_config::load_text("standard input", &text, &ProcessEnv),
                Err(error) => Err(ConfigError {
                    problems: vec![format!("standard input: cannot read: {error}")],
                }),
            }
        }
        Some(path) => tiergate_config::load(Some(path), &ProcessEnv),
        None => tiergate_config::load(config, &ProcessEnv),
    };
    let settings = match loaded {
        Ok(settings) => settings,
        Err(error) => return config_failed(&error),
    };
    if settings.listen.https.is_some() {
        if let Err(error) = gateway::tls::CertStore::load(&settings.tls) {
            return config_failed(&ConfigError {
                problems: vec![format!("tls: {error}")],
            });
        }
    }
    println!("configuration is valid");
    ExitCode::SUCCESS
}

/// Writes `bytes` to standard output; a closed pipe is an error message, not a panic.
fn write_stdout(bytes: &[u8]) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tiergate: cannot write to standard output: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Exit 0 when the probe answers 2xx, else 1: Docker and ECS read any other code as
/// failure too, but reserve 2, so even a bad configuration is a plain 1 here.
fn healthcheck(config: Option<&Path>, url: Option<String>, timeout: Duration) -> ExitCode {
    let url = match url {
        Some(url) => url,
        None => match tiergate_config::load(config, &ProcessEnv) {
            Ok(settings) => gateway::healthcheck::livez_url(settings.listen.admin),
            Err(error) => {
                eprintln!("tiergate healthcheck: {error}");
                return ExitCode::FAILURE;
            }
        },
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("tiergate healthcheck: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(gateway::healthcheck::probe(&url, timeout)) {
        Ok(status) if status.is_success() => {
            println!("healthy: {url} answered {status}");
            ExitCode::SUCCESS
        }
        Ok(status) => {
            eprintln!("unhealthy: {url} answered {status}");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("unhealthy: {url}: {error}");
            ExitCode::FAILURE
        }
    }
}

/// The commands that act on the fleet through PostgreSQL and Redis.
#[derive(Debug)]
enum Fleetwide {
    Split(SplitAction),
    Tasks,
    Rollout(gateway::control::RolloutAsk),
    RolloutStatus(String),
    RolloutAbort(String),
}

/// Runs a fleet command: its JSON on stdout and exit 0, or why not on stderr and exit 1
/// (a rolled-back rollout prints itself too).
fn control(settings: &Settings, command: Fleetwide) -> ExitCode {
    // stdout is the command's answer: the logs (warnings only) go to stderr.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("tiergate: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let commands = gateway::control::Commands::connect(settings).await?;
        match command {
            Fleetwide::Tasks => commands.fleet().await,
            Fleetwide::Split(SplitAction::Show { route }) => {
                commands.split_show(route.as_deref()).await
            }
            Fleetwide::Split(SplitAction::Set {
                route,
                weights,
                wait,
            }) => commands.split_set(&route, &weights, wait).await,
            Fleetwide::Split(SplitAction::Reset { route, wait }) => {
                commands.split_reset(&route, wait).await
            }
            Fleetwide::Rollout(ask) => commands.rollout(&ask).await,
            Fleetwide::RolloutStatus(route) => commands.rollout_status(&route).await,
            Fleetwide::RolloutAbort(route) => commands.rollout_abort(&route).await,
        }
    });
    match result {
        Ok(answer) => {
            println!("{answer:#}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            if let gateway::control::ControlError::Ended { rollout, .. } = &error {
                println!("{rollout:#}");
            }
            eprintln!("tiergate: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Starts logging and the runtime, runs `task`, and maps its error to exit code 1.
fn run_async<'a, F, Fut>(settings: &'a Settings, task: F) -> ExitCode
where
    F: FnOnce(&'a Settings) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    init_logging(settings.log.format);
    let threads = match settings.runtime.worker_threads {
        0 => std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        n => n,
    };
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(threads);
        builder
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("tiergate: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(task(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "Exiting.");
            eprintln!("tiergate: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Serves until SIGTERM; SIGHUP reloads the routes from `config` (and the environment).
async fn serve(settings: &Settings, config: Option<PathBuf>) -> anyhow::Result<()> {
    // Signals first: a SIGTERM during start-up must not be lost.
    let signals = Signals::install()?;
    let source = gateway::reload::ConfigSource::new(move || {
        tiergate_config::load(config.as_deref(), &ProcessEnv)
    });
    let server = gateway::Server::bind(settings)
        .await?
        .with_config_source(source);
    server.run(signals.first()).await
}

async fn migrate(settings: &Settings, timeout: Duration) -> anyhow::Result<()> {
    let db = app_core::store::Database::new(&settings.database)?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut delay = Duration::from_millis(200);
    loop {
        match db.migrate().await {
            Ok(applied) => {
                tracing::info!(applied, "Migrations done.");
                return Ok(());
            }
            Err(error) if tokio::time::Instant::now() + delay < deadline => {
                tracing::warn!(error = %app_core::ErrorChain(&error), "Database not ready; retrying.");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(error) => return Err(anyhow::Error::new(error).context("migrations failed")),
        }
    }
}

/// JSON lines on stdout (or text for people), filtered by `RUST_LOG` (default `info`).
fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        LogFormat::Text => builder.init(),
    }
}
