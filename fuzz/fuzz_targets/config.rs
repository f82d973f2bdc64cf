//! The configuration loader, as `serve`, `config check` and every SIGHUP reload run it: any
//! bytes as the `--config` file (first byte even), or as the flow file of a route (odd). It
//! must answer `Ok` or an error, never panic.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use clap::Parser;
use libfuzzer_sys::fuzz_target;

#[allow(dead_code, unreachable_pub, reason = "the binary's module; the fuzzer calls `load`")]
#[path = "../../crates/callgate/src/settings.rs"]
mod settings;

#[derive(clap::Parser)]
struct Cli {
    #[command(flatten)]
    settings: settings::Settings,
}

/// A data directory for the whole run (rendered speech, if any, goes there).
fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("callgate-fuzz-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temp dir");
        // The example flows name their prompts relative to themselves.
        let prompts = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/flows/prompts");
        let _ = std::os::unix::fs::symlink(prompts, dir.join("prompts"));
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, text)) = data.split_first() else {
        return;
    };
    let dir = dir();
    let config = dir.join("callgate.toml");
    let flow = dir.join("flow.toml");
    if mode % 2 == 0 {
        std::fs::write(&config, text).expect("write");
    } else {
        std::fs::write(&flow, text).expect("write");
        let route = format!(
            "data_dir = {:?}\n[[routes]]\nname = \"f\"\nagent = \"flow\"\nsettings = {{ file = {:?} }}\n",
            dir.join("data").display().to_string(),
            flow.display().to_string()
        );
        std::fs::write(&config, route).expect("write");
    }
    // As `callgate config check --config FILE` parses it.
    let cli = Cli::try_parse_from([std::ffi::OsStr::new("callgate"), "--config".as_ref(), config.as_os_str()])
        .expect("the flag parses");
    if let Err(e) = cli.settings.load() {
        let _ = format!("{e:#}");
    }
});
