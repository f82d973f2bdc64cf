//! The shipped flows load without errors or warnings, from disk (examples/flows) and built in.

use std::path::Path;

use callgate_flow::{FlowEnv, demo};
use callgate_testkit::TempDir;

#[test]
fn every_shipped_flow_loads_cleanly_from_disk_and_built_in() {
    let dir = TempDir::new("shipped");
    let env = FlowEnv {
        data_dir: dir.path().to_path_buf(),
        tts: Default::default(),
        callbridge: None,
        stt: None,
    };
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/flows");
    for name in demo::FLOWS {
        for path in [
            examples.join(format!("{name}.toml")),
            Path::new(demo::ROOT).join(format!("{name}.toml")),
        ] {
            let factory = callgate_flow::load(&path, &env)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(
                factory.flow().warnings.is_empty(),
                "{}: {:?}",
                path.display(),
                factory.flow().warnings
            );
        }
    }
    // No speech engine was needed: nothing was rendered.
    assert!(!dir.path().join("tts-cache").exists());
}
