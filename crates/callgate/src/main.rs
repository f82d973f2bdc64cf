//! The `callgate` binary: parse the command line, build the configuration, run the server.
//! Kept thin: everything else lives in the library crates.

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
    /// Run the server.
    Serve(Box<settings::Settings>),
    /// Place one call as a phone system would (CallBridge or inbound), with a timeline.
    Sim(Box<tools::SimArgs>),
    /// Place many concurrent calls and measure round trip, loss and CPU exactly.
    Load(Box<tools::LoadArgs>),
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
        let server =
            match callgate_server::Server::bind_with_routes(loaded.config, loaded.table).await {
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
        match server.run(shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                error!(error = %e, "Server failed.");
                ExitCode::FAILURE
            }
        }
    })
}

/// Resolves on SIGINT or SIGTERM, logging which arrived.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            error!("Cannot install signal handlers; stop the server with SIGKILL.");
            return std::future::pending().await;
        };
        let name = tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        };
        info!(signal = name, "Shutdown signal received.");
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        info!(signal = "ctrl-c", "Shutdown signal received.");
    }
}
