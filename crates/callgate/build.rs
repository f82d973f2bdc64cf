//! With the `vosk` feature: where libvosk.so is (`$CALLGATE_VOSK_LIB`, printed by
//! scripts/fetch-vosk), added to the link search path and to this package's binaries' and
//! tests' rpath, so they run without LD_LIBRARY_PATH. Without the feature: nothing.

fn main() {
    println!("cargo:rerun-if-env-changed=CALLGATE_VOSK_LIB");
    if std::env::var_os("CARGO_FEATURE_VOSK").is_none() {
        return;
    }
    let Some(dir) = std::env::var_os("CALLGATE_VOSK_LIB") else {
        eprintln!(
            "the vosk feature needs CALLGATE_VOSK_LIB, the directory holding libvosk.so: \
             run `eval \"$(scripts/fetch-vosk)\"` first"
        );
        std::process::exit(1);
    };
    let dir = std::path::PathBuf::from(dir);
    if !dir.join("libvosk.so").is_file() {
        eprintln!("CALLGATE_VOSK_LIB={}: no libvosk.so there", dir.display());
        std::process::exit(1);
    }
    println!("cargo:rustc-link-search=native={}", dir.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
}
