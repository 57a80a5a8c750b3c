//! Signals to a running `skiff serve`: `skiff signal reload|ldm|stop|quit`,
//! `skiff reload`, and nats-server's spelling `skiff serve --signal
//! reload[=PID|=PIDFILE]`. The server is named by its process id, given or
//! read from the file `skiff serve --pid-file` writes.
//!
//! | command | signal | the server |
//! |---|---|---|
//! | `reload` | SIGHUP | re-reads its config file ([`skiff::reload`]) |
//! | `ldm` | SIGUSR2 | enters lame duck mode, then exits ([`skiff::lame_duck`]) |
//! | `stop` | SIGTERM | shuts down gracefully |
//! | `quit` | SIGINT | shuts down gracefully |

use std::path::{Path, PathBuf};

/// A command for a running server, and the signal that carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Signal {
    /// Reload the config file (SIGHUP).
    Reload,
    /// Lame duck mode: move clients away, then exit (SIGUSR2).
    Ldm,
    /// Shut down gracefully (SIGTERM).
    Stop,
    /// Shut down gracefully (SIGINT).
    Quit,
}

impl Signal {
    fn number(self) -> libc::c_int {
        match self {
            Signal::Reload => libc::SIGHUP,
            Signal::Ldm => libc::SIGUSR2,
            Signal::Stop => libc::SIGTERM,
            Signal::Quit => libc::SIGINT,
        }
    }

    fn parse(name: &str) -> Option<Signal> {
        match name {
            "reload" => Some(Signal::Reload),
            "ldm" => Some(Signal::Ldm),
            "stop" => Some(Signal::Stop),
            "quit" => Some(Signal::Quit),
            _ => None,
        }
    }
}

/// Which process to signal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Pid(i32),
    /// A file holding the pid (`skiff serve --pid-file`).
    PidFile(PathBuf),
}

/// Why a signal could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    #[error("unknown command `{0}`: expected reload, ldm, stop or quit")]
    Unknown(String),
    #[error("say which server: --pid N or --pid-file FILE (written by skiff serve --pid-file)")]
    NoTarget,
    #[error("cannot read pid file {path}: {source}")]
    ReadPidFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} does not hold a process id")]
    BadPidFile { path: PathBuf },
    #[error("{0} is not a process id")]
    BadPid(i32),
    #[error("cannot signal process {pid}: {source}")]
    Send { pid: i32, source: std::io::Error },
}

/// Parses nats-server's `--signal` value: `reload`, `reload=PID` or
/// `reload=/path/to/pidfile`.
pub fn parse_command(text: &str) -> Result<(Signal, Option<Target>), SignalError> {
    let (name, target) = match text.split_once('=') {
        Some((name, target)) => (name, Some(target)),
        None => (text, None),
    };
    let signal = Signal::parse(name).ok_or_else(|| SignalError::Unknown(name.to_string()))?;
    let target = target.map(|t| match t.parse::<i32>() {
        Ok(pid) => Target::Pid(pid),
        Err(_) => Target::PidFile(PathBuf::from(t)),
    });
    Ok((signal, target))
}

/// Reads the pid a `--pid-file` holds.
pub fn read_pid_file(path: &Path) -> Result<i32, SignalError> {
    let text = std::fs::read_to_string(path).map_err(|source| SignalError::ReadPidFile {
        path: path.to_owned(),
        source,
    })?;
    text.trim().parse().map_err(|_| SignalError::BadPidFile {
        path: path.to_owned(),
    })
}

/// Sends `signal` to the process `target` names; returns its pid.
pub fn send(signal: Signal, target: &Target) -> Result<i32, SignalError> {
    let pid = match target {
        Target::Pid(pid) => *pid,
        Target::PidFile(path) => read_pid_file(path)?,
    };
    // 0 and negative numbers name process groups to kill(2): never that.
    if pid <= 0 {
        return Err(SignalError::BadPid(pid));
    }
    // SAFETY: kill takes plain integers and touches no memory of ours.
    if unsafe { libc::kill(pid, signal.number()) } != 0 {
        return Err(SignalError::Send {
            pid,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(pid)
}

/// This process's pid in `path` (`skiff serve --pid-file`), removed when
/// dropped.
pub struct PidFile(PathBuf);

impl PidFile {
    /// Writes the file atomically: a script that polls for it and signals
    /// the pid as soon as it appears never reads it empty or half-written.
    pub fn write(path: &Path) -> std::io::Result<PidFile> {
        let pid = format!("{}\n", std::process::id());
        skiff::fsutil::write_atomically(path, pid.as_bytes(), None)?;
        Ok(PidFile(path.to_owned()))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_values_as_nats_server_spells_them() {
        assert_eq!(parse_command("reload").unwrap(), (Signal::Reload, None));
        assert_eq!(
            parse_command("ldm=42").unwrap(),
            (Signal::Ldm, Some(Target::Pid(42)))
        );
        assert_eq!(
            parse_command("stop=/run/skiff.pid").unwrap(),
            (Signal::Stop, Some(Target::PidFile("/run/skiff.pid".into())))
        );
        assert!(matches!(
            parse_command("reopen"),
            Err(SignalError::Unknown(_))
        ));
    }

    #[test]
    fn pid_files_are_written_read_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("skiff.pid");
        let file = PidFile::write(&path).unwrap();
        assert_eq!(read_pid_file(&path).unwrap(), std::process::id() as i32);
        drop(file);
        assert!(!path.exists());
        std::fs::write(&path, "nope").unwrap();
        assert!(matches!(
            read_pid_file(&path),
            Err(SignalError::BadPidFile { .. })
        ));
        for pid in [0, -1] {
            assert!(matches!(
                send(Signal::Reload, &Target::Pid(pid)),
                Err(SignalError::BadPid(_))
            ));
        }
    }
}
