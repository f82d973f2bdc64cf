//! The shipped flows load without errors or warnings, from disk (examples/flows) and built in,
//! and their prompts carry the words they were rendered from.

use std::collections::HashMap;
use std::path::Path;

use callgate_flow::spec::{Prompt, PromptPart, StepKind};
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

/// The words `scripts/render-prompts` rendered each shipped prompt file from, by its path
/// relative to the flows (`prompts/en/welcome.wav`).
fn rendered_words() -> HashMap<String, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/render-prompts");
    let script = std::fs::read_to_string(&script).expect("scripts/render-prompts");
    let mut words = HashMap::new();
    for line in script.lines() {
        // render VOICE DIR NAME "TEXT"
        let Some(rest) = line.strip_prefix("render ") else {
            continue;
        };
        let mut parts = rest.splitn(4, ' ');
        let (Some(_voice), Some(dir), Some(name), Some(text)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            panic!("unexpected render line {line:?}");
        };
        let text = text
            .strip_prefix('"')
            .and_then(|t| t.strip_suffix('"'))
            .unwrap_or_else(|| panic!("unquoted text in {line:?}"));
        words.insert(format!("prompts/{dir}/{name}.wav"), text.to_owned());
    }
    assert!(words.len() > 10, "the script's render lines: {words:?}");
    words
}

#[test]
fn every_shipped_prompt_carries_the_words_it_was_rendered_from() {
    let dir = TempDir::new("shipped-words");
    let env = FlowEnv {
        data_dir: dir.path().to_path_buf(),
        tts: Default::default(),
        callbridge: None,
        stt: None,
    };
    let rendered = rendered_words();
    let mut checked = 0;
    for name in demo::FLOWS {
        let path = Path::new(demo::ROOT).join(format!("{name}.toml"));
        let factory = callgate_flow::load(&path, &env).expect("loads");
        for step in &factory.flow().steps {
            let prompts: Vec<&Prompt> = match &step.kind {
                StepKind::Play { prompt, .. } => vec![prompt],
                StepKind::Gather(g) => vec![&g.prompt, &g.retry_prompt],
                _ => vec![],
            };
            for prompt in prompts {
                let files: Vec<&str> = prompt
                    .parts
                    .iter()
                    .filter_map(|p| match p {
                        PromptPart::File(a) => Some(a.label.as_str()),
                        _ => None,
                    })
                    .collect();
                if files.is_empty() {
                    continue;
                }
                // What the files say, in order (a beep says nothing).
                let expected: Vec<&str> = files
                    .iter()
                    .filter_map(|f| rendered.get(*f).map(String::as_str))
                    .collect();
                assert_eq!(
                    prompt.words.as_deref(),
                    Some(expected.join(" ").as_str()),
                    "{name}: step {:?} ({files:?})",
                    step.name
                );
                checked += 1;
            }
        }
    }
    // Both menus: 8 prompts each (the gather's and its retry's counted apart).
    assert_eq!(checked, 16);
}
