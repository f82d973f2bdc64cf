//! The `callgate` binary: parse the command line, build the configuration, run the server.
//! Kept thin: everything else lives in the library crates.

mod routes;
mod settings;
mod tools;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing::{error, info};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Exit code for a configuration the server cannot run with (BSD `EX_USAGE`).
const EXIT_CONFIG: u8 = 64;

/// callgate answers phone calls over WebSocket (CallBridge and the inbound-call API) for voice
/// agents.
#[derive(Debug, Parser)]
#[command(name = "callgate", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Run the server (SIGHUP reloads the TLS certificates, and the routes, call keys and admin
    /// tokens of --config; SIGTERM drains: no new calls, live ones go on to their end, up to
    /// --drain-timeout, then exit 0; a second SIGTERM, or SIGINT, ends the live calls now).
    Serve(Box<settings::Settings>),
    /// Check the route table of a configuration, or ask which route a call would take.
    #[command(subcommand)]
    Routes(routes::RoutesCommand),
    /// Check a configuration: every setting, routes and agents' settings, `[admin]` tokens and
    /// `[call_auth]` keys (exit 64 with the problem named).
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Apply the store's schema migrations (SQLite in the data directory, or PostgreSQL with
    /// --store-url), or with --check list the pending ones and change nothing. `serve` applies
    /// them too at start.
    Migrate(Box<MigrateArgs>),
    /// Place one call as a phone system would (CallBridge or inbound), with a timeline.
    Sim(Box<tools::SimArgs>),
    /// Place many concurrent calls and measure round trip, loss and CPU exactly.
    Load(Box<tools::LoadArgs>),
}

/// `callgate migrate`.
#[derive(Debug, clap::Args)]
struct MigrateArgs {
    /// List the migrations not applied yet and change nothing (exit 0: none pending; 2: some
    /// are pending)
    #[arg(long)]
    check: bool,
    /// The server's settings (only the store's are used: --store-url, --data-dir, --config).
    #[command(flatten)]
    settings: settings::Settings,
}

/// `callgate config` subcommands.
#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate the configuration exactly as `serve` does, without binding anything, and print
    /// the route table.
    Check(Box<routes::CheckArgs>),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_CONFIG } else { 0 };
            // Printing the usage or the error; nothing to do if the terminal is gone.
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match cli.command {
        Commands::Serve(args) => serve(*args),
        Commands::Config(ConfigCommand::Check(args)) => {
            route_outcome(routes::run(routes::RoutesCommand::Check(args)))
        }
        Commands::Routes(command) => route_outcome(routes::run(command)),
        Commands::Migrate(args) => migrate(*args),
        Commands::Sim(args) => match tools::sim(*args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("callgate sim: {e:#}");
                ExitCode::FAILURE
            }
        },
        Commands::Load(args) => match tools::load(*args) {
            Ok(true) => ExitCode::SUCCESS,
            // The run completed, but some calls failed or frames were lost.
            Ok(false) => ExitCode::from(2),
            Err(e) => {
                eprintln!("callgate load: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// The exit status of `routes` and `config` subcommands.
fn route_outcome(outcome: routes::Outcome) -> ExitCode {
    match outcome {
        routes::Outcome::Ok => ExitCode::SUCCESS,
        routes::Outcome::NoRoute => ExitCode::FAILURE,
        routes::Outcome::Config(e) => {
            eprintln!("callgate: configuration error: {e:#}");
            ExitCode::from(EXIT_CONFIG)
        }
        routes::Outcome::Usage(message) => {
            eprintln!("callgate routes which: {message}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// `callgate migrate [--check]`: exit 0 when the schema is (or now is) current, 2 when
/// `--check` finds migrations pending, 1 when the store cannot be reached or its schema is
/// newer than this callgate, 64 for bad settings.
fn migrate(args: MigrateArgs) -> ExitCode {
    let loaded = match args.settings.load() {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("callgate: configuration error: {e:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let location = loaded.config.store_location();
    let where_ = match &location {
        callgate_store::Location::Sqlite { data_dir } => {
            format!("SQLite {}", data_dir.join("callgate.db").display())
        }
        callgate_store::Location::Postgres { url, .. } => format!("PostgreSQL {url}"),
    };
    let status = match location.schema_status() {
        Ok(status) => status,
        Err(e) => {
            eprintln!("callgate migrate: {where_}: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "{where_}: schema version {} (this callgate knows up to {})",
        status.current, status.known
    );
    if status.is_too_new() {
        eprintln!(
            "callgate migrate: the schema is newer than this callgate knows: run the newer \
             callgate (this one refuses to start against it)"
        );
        return ExitCode::FAILURE;
    }
    if status.pending.is_empty() {
        println!("up to date");
        return ExitCode::SUCCESS;
    }
    for m in &status.pending {
        println!("pending: {} {}", m.version, m.name);
    }
    if args.check {
        return ExitCode::from(2);
    }
    match location.migrate() {
        Ok(_) => {
            println!("applied {} migration(s)", status.pending.len());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("callgate migrate: {where_}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: settings::Settings) -> ExitCode {
    let loaded = match args.load() {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("callgate: configuration error: {e:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_max_level(tracing::Level::TRACE)
        .finish()
        .with(loaded.log_filter.clone())
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("callgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        // Installed before binding: the default action of every one of them ends the process.
        let signals = Signals::install();
        let settings::Loaded {
            mut config,
            table,
            fixed,
            ..
        } = loaded;
        // The flow agent's metrics (recordings stored and refused): one set for the process.
        config
            .metrics
            .push(std::sync::Arc::new(callgate_flow::metrics::FlowCollector(
                callgate_flow::FlowMetrics::process(),
            )));
        // The bridge agent's metrics (bot connections, marks, clears, bytes): likewise.
        config
            .metrics
            .push(std::sync::Arc::new(callgate_bridge::BridgeCollector(
                callgate_bridge::BridgeMetrics::process(),
            )));
        let server = match callgate_server::Server::bind_with_routes(config, table).await {
            Ok(server) => server,
            Err(e) if e.is_config() => {
                eprintln!("callgate: configuration error: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
            Err(e) => {
                error!(error = %e, "Cannot start.");
                eprintln!("callgate: cannot start: {e}");
                return ExitCode::FAILURE;
            }
        };
        let Signals { stop, hangup } = signals;
        let handles = Reloadable {
            routes: server.routes(),
            call_auth: server.call_auth(),
            admin_auth: server.admin_auth(),
            certificates: server.certificates(),
        };
        let reload = reload_on_hangup(hangup, &args, &fixed, handles);
        let signals = stop.forward(server.lifecycle());
        // The reload and signal loops never end: the server's end decides.
        let result = tokio::select! {
            result = server.run(std::future::pending()) => result,
            never = reload => match never {},
            never = signals => match never {},
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                error!(error = %e, "Server failed.");
                ExitCode::FAILURE
            }
        }
    })
}

/// The process's signal handlers, installed once before anything binds.
struct Signals {
    /// SIGTERM: drain (the second: stop now); SIGINT: stop now.
    stop: Stop,
    /// SIGHUP: reload certificates, routes, keys and tokens (`None` where there is no SIGHUP,
    /// or it could not be caught).
    hangup: Option<Hangup>,
}

#[cfg(unix)]
type Hangup = tokio::signal::unix::Signal;
#[cfg(not(unix))]
type Hangup = std::convert::Infallible;

/// The drain and shutdown signals.
struct Stop {
    #[cfg(unix)]
    signals: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let stop = match (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) {
                (Ok(int), Ok(term)) => Some((int, term)),
                _ => {
                    error!("Cannot install signal handlers; stop the server with SIGKILL.");
                    None
                }
            };
            let hangup = match signal(SignalKind::hangup()) {
                Ok(hangup) => Some(hangup),
                Err(e) => {
                    error!(error = %e, "Cannot install the SIGHUP handler; routes cannot be reloaded.");
                    None
                }
            };
            Self {
                stop: Stop { signals: stop },
                hangup,
            }
        }
        #[cfg(not(unix))]
        {
            Self {
                stop: Stop {},
                hangup: None,
            }
        }
    }
}

impl Stop {
    /// Hands every SIGTERM and SIGINT to the server, logging which arrived: the server
    /// decides what each means (the first SIGTERM drains, a second one or SIGINT stops now).
    /// Never returns.
    async fn forward(self, lifecycle: callgate_server::Lifecycle) -> std::convert::Infallible {
        #[cfg(unix)]
        {
            if let Some((mut int, mut term)) = self.signals {
                loop {
                    let (name, phase) = tokio::select! {
                        _ = int.recv() => ("SIGINT", lifecycle.interrupt().await),
                        _ = term.recv() => ("SIGTERM", lifecycle.terminate().await),
                    };
                    info!(signal = name, phase = phase.as_str(), "Signal received.");
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = self;
            if tokio::signal::ctrl_c().await.is_ok() {
                lifecycle.interrupt().await;
                info!(signal = "ctrl-c", "Signal received.");
            }
        }
        std::future::pending().await
    }
}

/// What SIGHUP replaces in the running server.
struct Reloadable {
    routes: callgate_server::RouteHandle,
    call_auth: callgate_server::call_auth::CallAuthHandle,
    admin_auth: callgate_server::auth::AdminAuthHandle,
    certificates: callgate_server::tls::Certificates,
}

/// On each SIGHUP, re-reads the TLS certificates (each port keeps its own if its files do
/// not load; the server logs each outcome), then the configuration, and puts its route
/// table, call keys and admin tokens in force for new calls and requests (live calls keep
/// theirs). A file that does not validate as a whole leaves all three as they are. Never
/// returns.
async fn reload_on_hangup(
    hangup: Option<Hangup>,
    args: &settings::Settings,
    running: &settings::Settings,
    handles: Reloadable,
) -> std::convert::Infallible {
    #[cfg(unix)]
    if let Some(mut hangup) = hangup {
        while hangup.recv().await.is_some() {
            if !handles.certificates.is_empty() {
                handles.certificates.reload().await;
            }
            let Some(file) = args.config_file() else {
                if handles.certificates.is_empty() {
                    info!("SIGHUP received; no --config file, nothing to reload.");
                } else {
                    info!("SIGHUP received; no --config file: only the TLS certificates reload.");
                }
                continue;
            };
            let file = file.display();
            // The new tokens are checked against the address really bound (the file may
            // name another one, which only a restart would bind).
            let loaded = args.load().and_then(|loaded| {
                handles
                    .admin_auth
                    .check(&loaded.config.admin_auth)
                    .map_err(|e| anyhow::anyhow!("[admin] on the bound address: {e}"))?;
                Ok(loaded)
            });
            match loaded {
                Ok(loaded) => {
                    let count = loaded.table.routes().len();
                    handles.routes.replace(loaded.table);
                    let keys = loaded.config.call_auth.keys.len();
                    handles.call_auth.replace(loaded.config.call_auth);
                    let tokens = loaded.config.admin_auth.tokens.len();
                    if let Err(e) = handles.admin_auth.replace(loaded.config.admin_auth) {
                        // Checked above; the address cannot have changed since.
                        error!(%file, error = %e, "SIGHUP: the admin tokens were refused.");
                    }
                    info!(
                        %file,
                        routes = count,
                        call_keys = keys,
                        admin_tokens = tokens,
                        "SIGHUP: reloaded the routes, the call keys and the admin tokens."
                    );
                    if loaded.fixed != *running {
                        info!(
                            %file,
                            "Settings other than routes, call keys and admin tokens differ from the running ones; they take effect at the next restart."
                        );
                    }
                }
                Err(e) => {
                    error!(%file, error = %format_args!("{e:#}"), "SIGHUP: cannot reload the routes; keeping the ones in force.");
                }
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (hangup, args, running, handles);
    std::future::pending().await
}
