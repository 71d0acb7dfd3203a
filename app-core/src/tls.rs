//! TLS to the backends: rustls client configurations for PostgreSQL and Redis.
//!
//! PostgreSQL follows libpq's `sslmode` (taken from the URL):
//!
//! | mode | encrypts | verifies the chain | verifies the host name |
//! |---|---|---|---|
//! | `disable` | no | – | – |
//! | `prefer` (default) | if the server offers it | no | no |
//! | `require` | yes | only when `database.ca_file` is set (as libpq with a root file) | no |
//! | `verify-ca` | yes | yes, against `database.ca_file` | no |
//! | `verify-full` | yes | yes, against `database.ca_file` | yes |
//!
//! tokio-postgres itself knows only the first three, so `verify-*` reach it as `require`
//! and the verification happens in the rustls configuration made here.

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};

/// libpq's `sslmode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS when the server offers it, unverified.
    Prefer,
    /// TLS, unverified unless a CA file is given.
    Require,
    /// TLS, chain verified.
    VerifyCa,
    /// TLS, chain and host name verified.
    VerifyFull,
}

impl SslMode {
    /// The mode a PostgreSQL URL asks for (`prefer` when it names none), and the URL to
    /// give tokio-postgres, which refuses the `verify-*` values. `None` for an unknown
    /// mode. Nothing of the URL but the mode is ever put in an error.
    pub fn split_url(url: &str) -> Option<(Self, String)> {
        let Some((base, query)) = url.split_once('?') else {
            return Some((Self::Prefer, url.to_owned()));
        };
        let mut mode = Self::Prefer;
        let mut params = Vec::new();
        for pair in query.split('&') {
            match pair.strip_prefix("sslmode=") {
                Some(value) => {
                    mode = match value {
                        "disable" => Self::Disable,
                        "prefer" => Self::Prefer,
                        "require" => Self::Require,
                        "verify-ca" => Self::VerifyCa,
                        "verify-full" => Self::VerifyFull,
                        _ => return None,
                    };
                    let passed = match mode {
                        Self::VerifyCa | Self::VerifyFull => "require",
                        _ => value,
                    };
                    params.push(format!("sslmode={passed}"));
                }
                None => params.push(pair.to_owned()),
            }
        }
        Some((mode, format!("{base}?{}", params.join("&"))))
    }
}

/// What to check of a server's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Nothing (libpq's `prefer` and `require`): encryption against passive eavesdroppers.
    Nothing,
    /// The chain up to a trusted root, whatever name it is for.
    Chain,
    /// The chain and that it is for the host connected to.
    ChainAndName,
}

/// A client configuration trusting the PEM bundle at `ca_file` (the system's roots are
/// not consulted: a database's CA is private, like RDS's).
///
/// # Errors
/// A human message naming the file: unreadable, or holding no certificate.
pub fn client_config(ca_file: Option<&Path>, verify: Verify) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let verifier: Arc<dyn ServerCertVerifier> = match (verify, ca_file) {
        (Verify::Nothing, _) => Arc::new(AnyCertificate::new(provider)),
        (_, None) => return Err("a CA file is needed to verify the server".to_owned()),
        (verify, Some(path)) => {
            let roots = Arc::new(roots(path)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| e.to_string())?;
            if verify == Verify::Chain {
                Arc::new(AnyCertificate {
                    provider,
                    chain: Some(webpki),
                })
            } else {
                webpki
            }
        }
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// The certificates of a PEM bundle as trust roots.
///
/// # Errors
/// A message naming the file when it is unreadable or holds no certificate.
pub fn roots(path: &Path) -> Result<RootCertStore, String> {
    let shown = path.display();
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{shown}: not a PEM certificate bundle: {e}"))?;
    let mut store = RootCertStore::empty();
    let (added, _ignored) = store.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!("{shown}: holds no usable CA certificate"));
    }
    Ok(store)
}

/// Accepts a server certificate whatever it is for, but still checks the handshake's
/// signatures with it: the connection is encrypted, to a server that holds the key of the
/// certificate it showed.
///
/// Made with [`AnyCertificate::new`] it checks nothing more, whoever that server is: libpq's
/// `sslmode=require` without a root file; the tests and loadgen's `--insecure` use it for
/// self-signed certificates (the server still pays for a real handshake). For `verify-ca`
/// it also runs webpki's full check of the chain, with only the name mismatch forgiven.
#[derive(Debug)]
pub struct AnyCertificate {
    provider: Arc<CryptoProvider>,
    chain: Option<Arc<WebPkiServerVerifier>>,
}

impl AnyCertificate {
    /// A verifier checking signatures with `provider`'s algorithms.
    pub fn new(provider: Arc<CryptoProvider>) -> Self {
        Self {
            provider,
            chain: None,
        }
    }
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    // webpki's verifier checks signatures the same way, with the same provider's algorithms.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_is_read_and_verify_modes_become_require() {
        let split = |url: &str| SslMode::split_url(url);
        assert_eq!(
            split("postgres://u:p@h/db"),
            Some((SslMode::Prefer, "postgres://u:p@h/db".to_owned()))
        );
        assert_eq!(
            split("postgres://h/db?application_name=x&sslmode=verify-full"),
            Some((
                SslMode::VerifyFull,
                "postgres://h/db?application_name=x&sslmode=require".to_owned()
            ))
        );
        assert_eq!(
            split("postgres://h/db?sslmode=disable").map(|s| s.0),
            Some(SslMode::Disable)
        );
        assert_eq!(split("postgres://h/db?sslmode=allow"), None);
    }
}
