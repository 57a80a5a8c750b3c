//! `skiff gen-certs`: a private certificate authority, a server certificate
//! and one client certificate per device, enough to run a fleet over mutual
//! TLS without touching openssl. Tests use the same pieces.
//!
//! Keys are ECDSA P-256 in PKCS#8 PEM; key files are written readable by
//! their owner only (mode 0600 on unix). Every file is written atomically
//! ([`skiff::fsutil::write_atomically`]), so running it again over earlier
//! output replaces each file whole. Certificates are valid for
//! [`VALIDITY_DAYS`] from now.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// How long generated certificates are valid.
pub const VALIDITY_DAYS: i64 = 825;

/// Why certificates could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A certificate and its private key, both PEM.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A certificate authority that signs server and device certificates.
pub struct Authority {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Authority {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str) -> Result<Authority, CertsError> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        valid_from_now(&mut params);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Authority { cert, key })
    }

    /// The CA certificate and key.
    pub fn issued(&self) -> Issued {
        Issued {
            cert_pem: self.cert.pem(),
            key_pem: self.key.serialize_pem(),
        }
    }

    /// A server certificate for `hosts` (DNS names or IP addresses). It is
    /// good for client authentication too, so that cluster nodes can present
    /// it when they dial each other (mutual TLS between routes).
    pub fn server(&self, hosts: &[String]) -> Result<Issued, CertsError> {
        let mut params = CertificateParams::new(hosts.to_vec())?;
        let name = hosts.first().map_or("skiff", String::as_str);
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        valid_from_now(&mut params);
        self.sign(params)
    }

    /// A client certificate whose subject is `CN=<name>,O=<organization>`.
    pub fn client(&self, name: &str, organization: &str) -> Result<Issued, CertsError> {
        let mut params = CertificateParams::default();
        // Most general first, as stored: the subject reads CN=..,O=...
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, organization);
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        valid_from_now(&mut params);
        self.sign(params)
    }

    /// Signs `params` as they are (validity included) with a fresh key.
    /// Tests use this for expired certificates.
    pub fn sign(&self, mut params: CertificateParams) -> Result<Issued, CertsError> {
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Valid from an hour ago (slack for clocks that are behind) for
/// [`VALIDITY_DAYS`].
pub fn valid_from_now(params: &mut CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(VALIDITY_DAYS);
}

/// What [`generate`] wrote.
#[derive(Debug)]
pub struct Generated {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// Each device's certificate and key.
    pub devices: Vec<(PathBuf, PathBuf)>,
}

/// Writes `ca.pem`, `ca-key.pem`, `server.pem`, `server-key.pem` and
/// `device-N.pem`/`device-N-key.pem` for N in 1..=devices into `dir`
/// (created if missing).
pub fn generate(dir: &Path, hosts: &[String], devices: usize) -> Result<Generated, CertsError> {
    std::fs::create_dir_all(dir).map_err(|source| CertsError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let ca = Authority::new("Skiff CA")?;
    let (ca_cert, _) = write_pair(dir, "ca", &ca.issued())?;
    let (server_cert, server_key) = write_pair(dir, "server", &ca.server(hosts)?)?;
    let devices = (1..=devices)
        .map(|n| {
            let name = format!("device-{n}");
            write_pair(dir, &name, &ca.client(&name, "Skiff Fleet")?)
        })
        .collect::<Result<_, _>>()?;
    Ok(Generated {
        ca: ca_cert,
        server_cert,
        server_key,
        devices,
    })
}

/// Writes `<name>.pem` and `<name>-key.pem` (owner-only).
fn write_pair(dir: &Path, name: &str, issued: &Issued) -> Result<(PathBuf, PathBuf), CertsError> {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}-key.pem"));
    write_file(&cert, &issued.cert_pem, false)?;
    write_file(&key, &issued.key_pem, true)?;
    Ok((cert, key))
}

/// Writes one PEM file atomically (a rerun over an earlier output never
/// leaves a torn key); a key is owner-only from the moment it is created.
fn write_file(path: &Path, text: &str, secret: bool) -> Result<(), CertsError> {
    let mode = secret.then_some(0o600);
    skiff::fsutil::write_atomically(path, text.as_bytes(), mode).map_err(|source| {
        CertsError::Write {
            path: path.to_owned(),
            source,
        }
    })
}

/// The `[tls]` table that enables mutual TLS with what [`generate`] wrote.
pub fn config_snippet(generated: &Generated) -> String {
    format!(
        "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nca_file = \"{}\"\nverify = true\n",
        generated.server_cert.display(),
        generated.server_key.display(),
        generated.ca.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff::config::TlsConfig;
    use skiff::tls::{load_certs, peer_identity, ServerTls};

    #[test]
    fn generated_files_make_a_working_mutual_tls_config() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let generated = generate(dir.path(), &hosts, 2).unwrap();
        assert_eq!(generated.devices.len(), 2);
        let snippet = config_snippet(&generated);
        let config = skiff::Config::from_toml(&snippet).unwrap();
        let tls: &TlsConfig = config.tls.as_ref().unwrap();
        ServerTls::load(tls).expect("server loads what gen-certs wrote");

        let (device_cert, device_key) = &generated.devices[1];
        let cert = &load_certs(device_cert, "certificate").unwrap()[0];
        let id = peer_identity(cert).unwrap();
        assert_eq!(id.subject, "CN=device-2,O=Skiff Fleet");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(device_key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            let mode = std::fs::metadata(&generated.ca)
                .unwrap()
                .permissions()
                .mode();
            assert_ne!(mode & 0o077, 0, "certificates are public");
        }
    }

    #[test]
    fn running_again_replaces_every_file_and_keeps_keys_private() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = vec!["localhost".to_string()];
        let first = generate(dir.path(), &hosts, 1).unwrap();
        let old_key = std::fs::read_to_string(&first.server_key).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            // Loosened by hand: the new key must not inherit it.
            let loose = std::fs::Permissions::from_mode(0o644);
            std::fs::set_permissions(&first.server_key, loose).unwrap();
        }
        let second = generate(dir.path(), &hosts, 1).unwrap();
        assert_ne!(
            std::fs::read_to_string(&second.server_key).unwrap(),
            old_key
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(&second.server_key).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        }
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let expected = [
            "ca-key.pem",
            "ca.pem",
            "device-1-key.pem",
            "device-1.pem",
            "server-key.pem",
            "server.pem",
        ];
        assert_eq!(names, expected, "no temporary files left");
    }
}
