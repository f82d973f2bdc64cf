//! Private files and directories: created 0700/0600 whatever the umask (recordings and
//! rendered speech may be personal data).

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::io::BufWriter;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a private file or directory could not be made. The message is the path and the
/// system's words (`/data/messages/x: Permission denied (os error 13)`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A directory or file could not be created, opened or given its mode.
    #[error("{}: {source}", path.display())]
    Io {
        /// The directory or file.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// A WAV file could not be written.
    #[error("{}: {source}", path.display())]
    Wav {
        /// The file.
        path: PathBuf,
        /// What the WAV writer said.
        source: hound::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates `dir` and its missing parents up to `root`, each `0700` (and sets `0700` on those
/// that exist, from `dir` up to `root`).
pub fn private_dirs(root: &Path, dir: &Path) -> Result<(), Error> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    let mut at = Some(dir);
    while let Some(d) = at {
        std::fs::set_permissions(d, Permissions::from_mode(0o700)).map_err(io(d))?;
        if d == root {
            break;
        }
        at = d.parent().filter(|p| p.starts_with(root));
    }
    Ok(())
}

/// Opens `path` for writing, created `0600` whatever the umask (truncated if it exists).
pub fn private_file(path: &Path) -> Result<std::fs::File, Error> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    // The umask may have taken bits from the mode, and an older file keeps its own.
    file.set_permissions(Permissions::from_mode(0o600))
        .map_err(io(path))?;
    Ok(file)
}

/// Writes mono 16-bit PCM as a WAV file created `0600`.
pub fn write_wav(path: &Path, rate: u32, samples: &[i16]) -> Result<(), Error> {
    let file = private_file(path)?;
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let fail = |source: hound::Error| Error::Wav {
        path: path.to_path_buf(),
        source,
    };
    let mut w = hound::WavWriter::new(BufWriter::new(file), spec).map_err(fail)?;
    let mut i16w = w.get_i16_writer(u32::try_from(samples.len()).unwrap_or(u32::MAX));
    for &s in samples {
        i16w.write_sample(s);
    }
    i16w.flush().map_err(fail)?;
    w.finalize().map_err(fail)
}
