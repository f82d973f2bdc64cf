//! `callgate routes check` and `callgate routes which`: the route table of a configuration,
//! validated exactly as `serve` validates it, without binding anything.

use callgate_proto::Protocol;
use callgate_server::RouteTable;
use callgate_server::routes::CallFacts;
use callgate_server::tls::{self, Port};

use crate::settings::{Loaded, Settings};

/// `callgate routes` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum RoutesCommand {
    /// Validate the configuration as `serve` does (exit 64 on error) and print the route table.
    Check(Box<CheckArgs>),
    /// Print the route a call with these facts would take (exit 1 if none would).
    Which(Box<WhichArgs>),
}

/// `callgate routes check` flags: the settings of `serve`.
#[derive(Debug, clap::Args)]
pub(crate) struct CheckArgs {
    #[command(flatten, next_help_heading = "Settings (as for serve)")]
    settings: Settings,
}

/// `callgate routes which` flags: the call's facts, then the settings of `serve`.
#[derive(Debug, clap::Args)]
pub(crate) struct WhichArgs {
    /// The call's protocol
    #[arg(long, value_enum)]
    protocol: ProtocolArg,
    /// CallBridge agentId [default: empty]
    #[arg(long, value_name = "ID")]
    agent_id: Option<String>,
    /// CallBridge agentType [default: empty]
    #[arg(long, value_name = "TYPE")]
    agent_type: Option<String>,
    /// CallBridge siteId [default: empty]
    #[arg(long, value_name = "ID")]
    site_id: Option<String>,
    /// The called number (inbound didNumber, CallBridge callee)
    #[arg(long, value_name = "NUMBER", default_value = "")]
    callee: String,
    /// The calling number (inbound callerId, CallBridge caller)
    #[arg(long, value_name = "NUMBER", default_value = "")]
    caller: String,
    /// A Twilio customParameter, for `custom.<name>` matches (repeatable)
    #[arg(long, value_name = "NAME=VALUE", value_parser = custom_parameter)]
    custom: Vec<(String, String)>,
    #[command(flatten, next_help_heading = "Settings (as for serve)")]
    settings: Settings,
}

/// The phone protocols, as `--protocol` spells them.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ProtocolArg {
    Callbridge,
    Inbound,
    Twilio,
}

fn custom_parameter(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{text:?}: write NAME=VALUE"))
}

/// What a `routes` command found.
pub(crate) enum Outcome {
    /// The configuration is valid (and, for `which`, a route takes the call).
    Ok,
    /// The configuration is invalid: exit 64.
    Config(anyhow::Error),
    /// `which`: the call's facts are not a call (exit 64).
    Usage(String),
    /// `which`: no route takes the call (exit 1).
    NoRoute,
}

/// Runs a `routes` subcommand, printing its answer on stdout.
pub(crate) fn run(command: RoutesCommand) -> Outcome {
    match command {
        RoutesCommand::Check(args) => match args.settings.load() {
            Ok(loaded) => match check_tls(&loaded) {
                Ok(tls) => {
                    print!("{}", describe(&args.settings, &loaded));
                    print!("{tls}");
                    Outcome::Ok
                }
                Err(e) => Outcome::Config(e),
            },
            Err(e) => Outcome::Config(e),
        },
        RoutesCommand::Which(args) => which(*args),
    }
}

fn which(args: WhichArgs) -> Outcome {
    let protocol = match args.protocol {
        ProtocolArg::Callbridge => Protocol::CallBridge,
        ProtocolArg::Inbound => Protocol::Inbound,
        ProtocolArg::Twilio => Protocol::Twilio,
    };
    if protocol != Protocol::CallBridge
        && (args.agent_id.is_some() || args.agent_type.is_some() || args.site_id.is_some())
    {
        return Outcome::Usage(format!(
            "--agent-id, --agent-type and --site-id are CallBridge fields: {protocol} calls \
             carry none"
        ));
    }
    if protocol != Protocol::Twilio && !args.custom.is_empty() {
        return Outcome::Usage(
            "--custom is a Twilio customParameter: only twilio calls carry them".to_owned(),
        );
    }
    let custom: std::collections::BTreeMap<String, String> = args.custom.iter().cloned().collect();
    let loaded = match args.settings.load() {
        Ok(loaded) => loaded,
        Err(e) => return Outcome::Config(e),
    };
    // A CallBridge call always carries these fields; one not given is empty.
    fn field(protocol: Protocol, v: &Option<String>) -> Option<&str> {
        match protocol {
            Protocol::CallBridge => Some(v.as_deref().unwrap_or("")),
            Protocol::Inbound | Protocol::Twilio => None,
        }
    }
    let facts = CallFacts {
        protocol,
        caller: &args.caller,
        callee: &args.callee,
        agent_id: field(protocol, &args.agent_id),
        agent_type: field(protocol, &args.agent_type),
        site_id: field(protocol, &args.site_id),
        custom: (protocol == Protocol::Twilio).then_some(&custom),
    };
    match loaded.table.route(&facts) {
        Some(route) => {
            println!("route {:?} (agent {})", &*route.name, route.agent);
            Outcome::Ok
        }
        None => {
            println!(
                "no route matches this call: it would be refused with close 1008 (end_reason \
                 no_route)"
            );
            Outcome::NoRoute
        }
    }
}

/// Loads each TLS port's certificate chain and key as `serve` would; the lines describing
/// them, or the first problem.
fn check_tls(loaded: &Loaded) -> anyhow::Result<String> {
    let mut out = String::new();
    for (port, scheme, files) in [
        (Port::Call, "wss://", &loaded.config.tls),
        (Port::Admin, "https://", &loaded.config.admin_tls),
    ] {
        let Some(files) = files else { continue };
        let checked = tls::check(files)
            .map_err(|source| anyhow::Error::new(callgate_server::Error::Tls { port, source }))?;
        out.push_str(&format!(
            "TLS on the {port} port ({scheme}): {} ({} certificate{} in the chain), key {}\n",
            files.cert.display(),
            checked.certificates,
            if checked.certificates == 1 { "" } else { "s" },
            files.key.display(),
        ));
    }
    Ok(out)
}

/// The `routes check` report: where the routes come from, then the table in order.
fn describe(settings: &Settings, loaded: &Loaded) -> String {
    let source = match settings.config_file() {
        Some(path) => format!("config file {}", path.display()),
        None => "no config file".to_owned(),
    };
    let table = &loaded.table;
    let mut out = format!(
        "Configuration OK ({source}): {} route{}, first match wins.\n",
        table.routes().len(),
        if table.routes().len() == 1 { "" } else { "s" }
    );
    out.push_str(&table_text(table));
    out
}

/// The table as aligned columns; the default route (always last) is marked.
fn table_text(table: &RouteTable) -> String {
    let routes = table.routes();
    let default = table.has_default().then(|| routes.len().saturating_sub(1));
    let rows: Vec<[String; 4]> = routes
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mark = if Some(i) == default { "*" } else { "" };
            [
                format!("{}{mark}", i + 1),
                r.name.to_string(),
                r.agent.to_string(),
                r.describe_match(),
            ]
        })
        .collect();
    let header = ["#", "route", "agent", "match"].map(str::to_owned);
    let width = |col: usize| {
        std::iter::once(&header)
            .chain(&rows)
            .map(|r| r[col].chars().count())
            .max()
            .unwrap_or(0)
    };
    let widths = [width(0), width(1), width(2)];
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        out.push_str(&format!(
            "{:<w0$}  {:<w1$}  {:<w2$}  {}\n",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
        ));
    }
    match default {
        Some(_) => out.push_str("* the default route: it takes every call no route above takes\n"),
        None => out.push_str(
            "No default route: a call no route matches is refused with close 1008 (end_reason \
             no_route).\n",
        ),
    }
    out
}
