//! No configuration makes callgate panic: every TOML block of the docs and every example flow,
//! mutated byte by byte (a deterministic generator), is loaded by `callgate config check`,
//! which must answer valid (0) or a configuration error (64), never crash (101). The same
//! loader runs under `cargo fuzz` (fuzz/fuzz_targets/config.rs); this is its smoke test on the
//! stable toolchain.

use std::path::Path;
use std::process::Command;

use callgate_testkit::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_callgate");
/// Mutated files per seed.
const PER_SEED: usize = 6;

/// xorshift64*: reproducible, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Bytes that make TOML and our values interesting.
const PIECES: &[&[u8]] = &[
    b"\"",
    b"'",
    b"[",
    b"]",
    b"{",
    b"}",
    b"=",
    b"\n",
    b",",
    b"#",
    b"\\",
    b"0",
    b"-1",
    b"99999999999999999999",
    b"\xe2\x82\xac",
    b"\xff",
    b"\"\"",
    b"[[routes]]\n",
    b"1e400",
    b"nan",
    b"\"0s\"",
    b"\"18446744073709551616ms\"",
    b"\"{{caller}}\"",
    b"true",
];

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut data = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(data.len() + 1);
        match rng.below(4) {
            0 if !data.is_empty() => {
                let end = (at + 1 + rng.below(8)).min(data.len());
                data.drain(at.min(end)..end);
            }
            1 if at < data.len() => data[at] = rng.next() as u8,
            2 => {
                let piece = PIECES[rng.below(PIECES.len())];
                data.splice(at..at, piece.iter().copied());
            }
            _ => {
                // Duplicate a line: repeated keys and tables.
                let text = data.clone();
                let lines: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
                let line = lines[rng.below(lines.len())];
                data.splice(at..at, line.iter().copied().chain([b'\n']));
            }
        }
    }
    data
}

fn toml_blocks(path: &Path) -> Vec<Vec<u8>> {
    let text = std::fs::read_to_string(path).expect("read a doc");
    text.split("```toml\n")
        .skip(1)
        .filter_map(|rest| {
            rest.split_once("```")
                .map(|(block, _)| block.as_bytes().to_vec())
        })
        .collect()
}

#[test]
fn mutated_configurations_are_refused_never_crash() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = TempDir::new("config-mutations");
    let mut seeds: Vec<(bool, Vec<u8>)> = Vec::new();
    for doc in [
        "README.md",
        "docs/configuration.md",
        "docs/realtime.md",
        "docs/flows.md",
    ] {
        seeds.extend(toml_blocks(&root.join(doc)).into_iter().map(|b| (false, b)));
    }
    for flow in ["menu.toml", "menu-ko.toml", "seed-demo.toml"] {
        let bytes = std::fs::read(root.join("examples/flows").join(flow)).expect("a flow");
        seeds.push((true, bytes));
    }
    assert!(
        seeds.len() > 10,
        "the docs have TOML blocks: {}",
        seeds.len()
    );
    let _ = std::os::unix::fs::symlink(
        root.join("examples/flows/prompts"),
        dir.path().join("prompts"),
    );
    let config = dir.path().join("callgate.toml");
    let flow = dir.path().join("flow.toml");
    let mut rng = Rng(0x5eed_c0ff_ee15_0015);
    let (mut valid, mut refused) = (0, 0);
    for (is_flow, seed) in &seeds {
        for _ in 0..PER_SEED {
            let data = mutate(&mut rng, seed);
            if *is_flow {
                std::fs::write(&flow, &data).unwrap();
                std::fs::write(
                    &config,
                    format!(
                        "[[routes]]\nname = \"f\"\nagent = \"flow\"\nsettings = {{ file = {:?} }}\n",
                        flow.display().to_string()
                    ),
                )
                .unwrap();
            } else {
                std::fs::write(&config, &data).unwrap();
            }
            let out = Command::new(BIN)
                .args(["config", "check", "--config"])
                .arg(&config)
                .arg("--data-dir")
                .arg(dir.path().join("data"))
                .env_remove("CALLGATE_CONFIG")
                .env_remove("CALLGATE_AGENT")
                .output()
                .expect("run callgate");
            let stderr = String::from_utf8_lossy(&out.stderr);
            let input = String::from_utf8_lossy(&data);
            assert!(
                matches!(out.status.code(), Some(0 | 64)),
                "exit {:?} for:\n{input}\n---\n{stderr}",
                out.status.code()
            );
            assert!(!stderr.contains("panicked"), "{input}\n---\n{stderr}");
            if out.status.code() == Some(0) {
                valid += 1;
            } else {
                refused += 1;
            }
        }
    }
    // Both answers happen: the mutations are neither all harmless nor all fatal.
    assert!(valid > 0 && refused > 0, "valid {valid}, refused {refused}");
}
