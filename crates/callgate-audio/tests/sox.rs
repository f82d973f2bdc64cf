//! G.711 against sox-made files: sox (an independent, widely used implementation) encodes and
//! decodes every 16-bit value; our tables must agree.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a panic with its location is the failure report"
)]

use std::path::Path;
use std::process::Command;

use callgate_audio::{g711, wav};

fn sox(args: &[&str]) {
    let status = Command::new("sox")
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("sox must be installed (apt-get install sox): {e}"));
    assert!(status.success(), "sox {args:?} failed");
}

fn dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("callgate-sox-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Every 16-bit value once, as an 8 kHz mono WAV.
fn all_values(path: &Path) -> Vec<i16> {
    let values: Vec<i16> = (i16::MIN..=i16::MAX).collect();
    wav::write_mono(path, 8000, &values).unwrap();
    values
}

#[test]
fn decoding_matches_sox_for_every_code() {
    let d = dir("decode");
    for (law, table, name) in [
        ("u-law", &g711::ULAW_TO_PCM, "ulaw"),
        ("a-law", &g711::ALAW_TO_PCM, "alaw"),
    ] {
        let codes: Vec<u8> = (0..=255).collect();
        let raw = d.join(format!("codes.{name}"));
        std::fs::write(&raw, &codes).unwrap();
        let out = d.join(format!("decoded-{name}.wav"));
        sox(&[
            "-t",
            "raw",
            "-r",
            "8000",
            "-c",
            "1",
            "-e",
            law,
            "-b",
            "8",
            raw.to_str().unwrap(),
            "-b",
            "16",
            out.to_str().unwrap(),
        ]);
        let decoded = wav::read_mono(&out).unwrap().samples;
        assert_eq!(decoded.len(), 256);
        for (code, &s) in decoded.iter().enumerate() {
            assert_eq!(table[code], s, "{law} code {code:#04x}");
        }
    }
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn encoding_agrees_with_sox_for_every_value() {
    let d = dir("encode");
    let input = d.join("all.wav");
    let values = all_values(&input);
    for (law, encode, name) in [
        ("u-law", g711::ulaw_encode as fn(i16) -> u8, "ulaw"),
        ("a-law", g711::alaw_encode as fn(i16) -> u8, "alaw"),
    ] {
        let out = d.join(format!("all.{name}"));
        // -D: no dither, so sox quantises exactly like a codec.
        sox(&[
            "-D",
            input.to_str().unwrap(),
            "-t",
            "raw",
            "-e",
            law,
            "-b",
            "8",
            out.to_str().unwrap(),
        ]);
        let theirs = std::fs::read(&out).unwrap();
        assert_eq!(theirs.len(), values.len());
        // Implementations differ on how they round negative values at segment edges (G.191
        // uses the one's complement, which we follow; others the two's complement), so the
        // codes may differ by one step there; what a caller hears must not.
        let mut differ = 0;
        for (&v, &t) in values.iter().zip(&theirs) {
            let ours = encode(v);
            if ours != t {
                differ += 1;
                let table = if name == "ulaw" {
                    &g711::ULAW_TO_PCM
                } else {
                    &g711::ALAW_TO_PCM
                };
                let (a, b) = (table[ours as usize], table[t as usize]);
                // Neighbouring quantisation levels, or both next to zero. Codes are stored
                // inverted (mu-law) or with alternate bits flipped (A-law): undo that first.
                let level = |c: u8| if name == "ulaw" { !c } else { c ^ 0x55 };
                let (x, y) = (level(ours), level(t));
                let adjacent =
                    x & 0x80 == y & 0x80 && (i32::from(x & 0x7F) - i32::from(y & 0x7F)).abs() == 1;
                let near_zero = i32::from(a).abs() <= 16 && i32::from(b).abs() <= 16;
                assert!(
                    adjacent || near_zero,
                    "{law} {v}: ours {ours:#04x}={a}, sox {t:#04x}={b}"
                );
            }
        }
        println!("{law}: {differ} of 65536 codes differ from sox by one step");
        assert!(differ < 65536 / 50, "{law}: {differ} codes differ");
    }
    let _ = std::fs::remove_dir_all(d);
}
