//! Files Skiff writes itself (the store's sync marker, the pid file,
//! `skiff gen-certs` output), written so that a crash at any moment leaves
//! either the old content or the new, never a mix or an empty file.
//! Public for the tools crate (`skiff-tools`), which writes the last two.
//!
//! [`write_atomically`] replaces a file whole: a reader (or the next start
//! after a crash or power cut) sees either the old content or the new one,
//! never a truncated or half-written file. It writes a temporary file in
//! the same directory (a rename is atomic only within one file system),
//! fsyncs it, renames it over the target and fsyncs the directory, so that
//! the rename itself is on disk when the call returns.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Tells apart the temporary files of concurrent writers in one process;
/// the process id tells apart processes. A fixed temporary name would let
/// two writers interleave, and reusing a stale one would keep its (maybe
/// looser) mode, since a mode given at open applies only to a new file.
static NEXT_TEMP: AtomicU64 = AtomicU64::new(0);

/// Replaces `path` with `bytes`, atomically and durably (see the module
/// docs).
///
/// `mode` (unix permission bits, e.g. `0o600` for a private key) is given
/// to the temporary file when it is created, before a byte is written, so
/// a secret is never readable by others even for a moment; the file ends
/// with exactly that mode. `None` creates it as `std::fs::write` would
/// (0666 less the umask). Either way the new file does not inherit the
/// mode of the one it replaces.
///
/// On error the target is left as it was and the temporary file is
/// removed; only a crash in the middle can leave one behind (named
/// `.<file name>.tmp-<pid>-<n>`, beside the target).
pub fn write_atomically(path: &Path, bytes: &[u8], mode: Option<u32>) -> io::Result<()> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} does not name a file", path.display()),
        )
    })?;
    // `Path::parent` of a bare file name is "", which names no directory.
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let (temp, file) = create_temp(dir, &name.to_string_lossy(), mode)?;
    let written = fill(file, bytes, mode).and_then(|()| std::fs::rename(&temp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(e);
    }
    sync_dir(dir)
}

/// Creates a new, unique temporary file in `dir` (never an existing one:
/// `create_new`), with `mode` from the start.
fn create_temp(dir: &Path, name: &str, mode: Option<u32>) -> io::Result<(PathBuf, File)> {
    loop {
        let n = NEXT_TEMP.fetch_add(1, Ordering::Relaxed);
        let temp = dir.join(format!(".{name}.tmp-{}-{n}", std::process::id()));
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        if let Some(mode) = mode {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(mode);
        }
        match options.open(&temp) {
            Ok(file) => return Ok((temp, file)),
            // Left by a crashed process that had our pid: take the next.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Writes `bytes`, sets `mode` exactly (creation is subject to the umask)
/// and fsyncs.
fn fill(mut file: File, bytes: &[u8], mode: Option<u32>) -> io::Result<()> {
    #[cfg(unix)]
    if let Some(mode) = mode {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    }
    #[cfg(not(unix))]
    let _ = mode;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Fsyncs a directory, so that a rename or a new entry in it is durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    File::open(dir)?.sync_all()?;
    // Elsewhere a directory cannot be opened as a file; the rename stands.
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn content_is_replaced_whole_and_no_temporary_file_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        write_atomically(&path, b"a much longer first version\n", None).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"a much longer first version\n"
        );
        write_atomically(&path, b"short\n", None).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"short\n");
        assert_eq!(entries(dir.path()), ["state"]);
    }

    #[test]
    fn a_failed_write_leaves_the_target_and_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("target");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("inside"), b"x").unwrap();
        // A file cannot be renamed over a non-empty directory.
        assert!(write_atomically(&path, b"new", None).is_err());
        assert!(path.is_dir());
        assert_eq!(entries(dir.path()), ["target"]);
        let missing = dir.path().join("no-such-dir").join("file");
        assert!(write_atomically(&missing, b"new", None).is_err());
    }

    #[test]
    fn a_path_without_a_file_name_is_refused() {
        let err = write_atomically(Path::new("/"), b"x", None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[cfg(unix)]
    #[test]
    fn secrets_get_their_mode_even_over_a_readable_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        std::fs::write(&path, b"old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_atomically(&path, b"secret", Some(0o600)).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read(&path).unwrap(), b"secret");
        write_atomically(&path, b"public", Some(0o644)).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644, "the mode asked for, exactly");
        assert_eq!(entries(dir.path()), ["key.pem"]);
    }
}
