//! Runs callgate with the keypad agent answering every call:
//! `cargo run -p callgate-example-keypad -- [CALL_ADDR] [ADMIN_ADDR] [DATA_DIR]`
//! (defaults `127.0.0.1:4143`, `127.0.0.1:4144`, `./data`), then in another terminal:
//! `cargo run -p callgate -- sim --dtmf "1@1s,2@1.5s,#@2s" --wait-hangup --record keys.wav`.

use std::process::ExitCode;

use callgate_agent::Catalog;
use callgate_server::routes::RouteSpec;
use callgate_server::{Config, Server};

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut config = Config::default();
    let parsed = (|| -> Result<(), String> {
        if let Some(a) = args.next() {
            config.listen = a.parse().map_err(|e| format!("call address {a:?}: {e}"))?;
        }
        if let Some(a) = args.next() {
            config.admin_listen = a.parse().map_err(|e| format!("admin address {a:?}: {e}"))?;
        }
        if let Some(a) = args.next() {
            config.data_dir = a.into();
        }
        Ok(())
    })();
    if let Err(e) = parsed {
        eprintln!("keypad: {e}");
        return ExitCode::from(64);
    }
    config.routes = vec![RouteSpec {
        name: "keypad".into(),
        agent: callgate_example_keypad::NAME.into(),
        matcher: None,
        settings: serde_json::json!({ "max_digits": 8 }),
    }];
    let mut catalog = Catalog::builtin();
    callgate_example_keypad::register(&mut catalog);
    let server = match Server::bind_with_catalog(config, &catalog).await {
        Ok(server) => server,
        Err(e) => {
            eprintln!("keypad: {e}");
            return ExitCode::from(if e.is_config() { 64 } else { 1 });
        }
    };
    println!("keypad agent answering on {}", server.call_addr());
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    match server.run(stop).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keypad: {e}");
            ExitCode::FAILURE
        }
    }
}
