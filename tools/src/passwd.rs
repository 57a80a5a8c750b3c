//! `skiff passwd`: a bcrypt hash of a password, for `password = "..."` in
//! the `[authorization]` table, so the config file never holds the password
//! itself.

use std::io::{BufRead, IsTerminal, Write};

/// The cost the `nats` CLI uses: about 0.1 s per check on a current core,
/// paid once per CONNECT.
pub const DEFAULT_COST: u32 = 11;

/// Why no hash could be made.
#[derive(Debug, thiserror::Error)]
pub enum PasswdError {
    #[error("cannot read the password: {0}")]
    Read(#[from] std::io::Error),
    #[error("the password is empty")]
    Empty,
    #[error("the passwords do not match")]
    Mismatch,
    #[error("cannot hash: {0}")]
    Hash(#[from] bcrypt::BcryptError),
}

/// A bcrypt hash (`$2b$...`) of `password` with `cost` (4 to 31).
pub fn hash(password: &str, cost: u32) -> Result<String, PasswdError> {
    if password.is_empty() {
        return Err(PasswdError::Empty);
    }
    Ok(bcrypt::hash(password, cost)?)
}

/// Reads the password: from a terminal, asked twice without echo; from a
/// pipe, the first line.
pub fn read_password() -> Result<String, PasswdError> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        let mut line = String::new();
        stdin.lock().read_line(&mut line)?;
        return Ok(line.trim_end_matches(['\r', '\n']).to_string());
    }
    let first = prompt("Enter password: ")?;
    let again = prompt("Reenter password: ")?;
    if first != again {
        return Err(PasswdError::Mismatch);
    }
    Ok(first)
}

/// Asks on stderr and reads one line with the terminal's echo off.
fn prompt(text: &str) -> Result<String, PasswdError> {
    let mut err = std::io::stderr();
    write!(err, "{text}")?;
    err.flush()?;
    let echo = EchoOff::new();
    let mut line = String::new();
    let read = std::io::stdin().lock().read_line(&mut line);
    drop(echo);
    writeln!(err)?;
    read?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

/// Turns the terminal's echo off while alive (if stdin is a terminal whose
/// settings can be read).
struct EchoOff(Option<libc::termios>);

impl EchoOff {
    fn new() -> EchoOff {
        // SAFETY: tcgetattr writes a termios for fd 0 into `t` (zeroed is a
        // valid termios); on failure it is discarded.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
            return EchoOff(None);
        }
        let saved = t;
        t.c_lflag &= !libc::ECHO;
        // SAFETY: `t` is the terminal's own settings with ECHO cleared.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        EchoOff(Some(saved))
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            // SAFETY: restores settings read from the same terminal.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, saved) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_and_empty_passwords_are_refused() {
        let h = hash("pw", 4).unwrap();
        assert!(h.starts_with("$2b$04$"), "{h}");
        assert!(bcrypt::verify("pw", &h).unwrap());
        assert!(matches!(hash("", 4), Err(PasswdError::Empty)));
        assert!(hash("pw", 3).is_err());
    }
}
