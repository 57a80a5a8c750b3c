//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the
//! same checks the cargo-fuzz targets run, so plain `cargo test` covers every
//! input the fuzzers found interesting without needing cargo-fuzz or nightly.

#[path = "../fuzz/common/checks.rs"]
mod checks;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no corpus", dir.display());
    let mut failed = Vec::new();
    for path in &files {
        let data = std::fs::read(path).unwrap();
        if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} {target} corpus inputs fail: {failed:#?}",
        failed.len(),
        files.len()
    );
}

#[test]
fn client_parser_corpus() {
    replay("client_parser", checks::client_parser);
}

#[test]
fn server_parser_corpus() {
    replay("server_parser", checks::server_parser);
}

#[test]
fn route_parser_corpus() {
    replay("route_parser", checks::route_parser);
}

#[test]
fn sublist_corpus() {
    replay("sublist", checks::sublist);
}

#[test]
fn connect_json_corpus() {
    replay("connect_json", checks::connect_json);
}

#[test]
fn connect_auth_corpus() {
    replay("connect_auth", checks::connect_auth);
}

/// The seed inputs reach acceptance, so the fuzzer starts from both sides
/// of every check rather than only from refusals.
#[test]
fn connect_auth_seeds_include_accepted_logins() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/connect_auth");
    for seed in ["seed-plain", "seed-bcrypt", "seed-nkey", "seed-cert"] {
        let data = std::fs::read(dir.join(seed)).unwrap();
        let (flags, rest) = data.split_first().unwrap();
        let (cert, json) = if flags & 2 == 2 {
            let at = rest.iter().position(|&b| b == b'\n').unwrap();
            let subject = String::from_utf8(rest[..at].to_vec()).unwrap();
            let cert = skiff::tls::PeerIdentity {
                subject,
                sans: Vec::new(),
            };
            (Some(cert), &rest[at + 1..])
        } else {
            (None, rest)
        };
        let connect = skiff::protocol::ConnectOptions::from_json(json).unwrap();
        let accepted = checks::fixed_authenticator().authenticate(
            &connect,
            Some(checks::FUZZ_NONCE),
            cert.as_ref(),
        );
        assert!(accepted.is_ok(), "{seed}: {:?}", accepted.err());
    }
}
