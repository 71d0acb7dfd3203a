//! TLS termination for the HTTPS listener: certificates, SNI, reload.
//!
//! - [`CertStore`] holds the certificates as one immutable [`CertMap`] behind an
//!   [`ArcSwap`]. rustls asks it for a certificate on every handshake
//!   ([`ResolvesServerCert`]); a reload builds a whole new map and swaps it in, so a
//!   handshake sees either the old set or the new one, never a mix, and connections that
//!   are already open keep the certificate they were made with.
//! - A reload that fails (a missing file, a key that does not match its certificate, a
//!   half-written PEM) is logged and changes nothing: the old certificates keep serving.
//! - Reloads happen when a file changes (polled, see [`watch`]) and on SIGHUP.
//! - Without configured certificates, a self-signed one for `localhost` is made at start
//!   (a developer's box), and its SHA-256 fingerprint is logged so a client can pin it.
//!
//! Crypto is rustls' `ring` provider: it builds with a C compiler alone (aws-lc-rs also
//! needs cmake), and the PostgreSQL and Redis clients use the same one.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, SupportedProtocolVersion};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tiergate_config::{TlsSettings, TlsVersion};
use tokio::signal::unix::{SignalKind, signal};

/// TLS sessions remembered for resumption (TLS 1.2 session ids, TLS 1.3 stateful
/// tickets); rustls' default of 256 is small for a busy public listener.
const SESSION_CACHE_SIZE: usize = 8192;

/// Why certificates could not be loaded. Messages name files, never key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A file holds no usable PEM of the expected kind.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// rustls refused the key or the pair (unsupported algorithm, key does not match).
    #[error("{cert} with {key}: {source}")]
    Key {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls' reason.
        source: rustls::Error,
    },
    /// The self-signed certificate could not be made.
    #[error("cannot make a self-signed certificate: {0}")]
    SelfSigned(#[from] rcgen::Error),
    /// rustls refused the configuration (practically never).
    #[error("TLS configuration refused: {0}")]
    Config(#[from] rustls::Error),
}

/// One certificate file pair and the names it serves (none: the default).
#[derive(Debug, Clone)]
struct Source {
    cert: PathBuf,
    key: PathBuf,
    names: Vec<String>,
}

/// One immutable set of certificates: exact names, `*.` wildcards, and a default.
#[derive(Debug)]
pub struct CertMap {
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the part after `*.`: `*.example.com` is stored as `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

impl CertMap {
    /// The certificate for an SNI name: exact match, then a wildcard one label up, then
    /// the default (a client that names no known host still gets an answer it can judge).
    fn lookup(&self, name: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = name else {
            return self.default.clone();
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(key) = self.exact.get(&name) {
            return key.clone();
        }
        if let Some(key) = name
            .split_once('.')
            .and_then(|(_, parent)| self.wildcard.get(parent))
        {
            return key.clone();
        }
        self.default.clone()
    }

    /// The default certificate's leaf.
    pub fn default_leaf(&self) -> Option<&CertificateDer<'static>> {
        self.default.cert.first()
    }
}

/// The HTTPS listener's certificates, swapped whole on reload.
#[derive(Debug)]
pub struct CertStore {
    current: ArcSwap<CertMap>,
    /// Empty for a self-signed certificate, which is never reloaded.
    sources: Vec<Source>,
    provider: Arc<CryptoProvider>,
}

impl CertStore {
    /// Loads the configured certificates, or makes a self-signed one when none is set.
    ///
    /// # Errors
    /// A file is unreadable or malformed, or a key does not match its certificate.
    pub fn load(settings: &TlsSettings) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut sources = Vec::new();
        if let (Some(cert), Some(key)) = (&settings.cert, &settings.key) {
            sources.push(Source {
                cert: cert.clone(),
                key: key.clone(),
                names: Vec::new(),
            });
        }
        sources.extend(settings.certificates.iter().map(|c| Source {
            cert: c.cert.clone(),
            key: c.key.clone(),
            names: c.server_names.clone(),
        }));
        let map = if sources.is_empty() {
            self_signed(&provider)?
        } else {
            build_map(&sources, &provider)?
        };
        Ok(Self {
            current: ArcSwap::from_pointee(map),
            sources,
            provider,
        })
    }

    /// The certificates new handshakes get now.
    pub fn current(&self) -> Arc<CertMap> {
        self.current.load_full()
    }

    /// Reads every file again and swaps the new set in. On error nothing changes.
    ///
    /// # Errors
    /// As for [`CertStore::load`]; the old certificates stay in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        if self.sources.is_empty() {
            return Ok(());
        }
        let map = build_map(&self.sources, &self.provider)?;
        self.current.store(Arc::new(map));
        Ok(())
    }

    /// The certificate and key files, for the watcher.
    fn files(&self) -> impl Iterator<Item = &Path> {
        self.sources
            .iter()
            .flat_map(|s| [s.cert.as_path(), s.key.as_path()])
    }
}

/// rustls' view of the store: one lookup in the current map per handshake.
#[derive(Debug)]
struct Resolver(Arc<CertStore>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current.load().lookup(hello.server_name()))
    }
}

/// The rustls configuration of the HTTPS listener: certificates from `store`, ALPN `h2`
/// then `http/1.1`, TLS 1.3 and (unless `min_version` is 1.3) 1.2, session resumption by
/// tickets and by a session cache.
///
/// # Errors
/// rustls refuses the versions or cannot make a ticket key (practically never).
pub fn server_config(
    store: Arc<CertStore>,
    min_version: TlsVersion,
) -> Result<Arc<ServerConfig>, TlsError> {
    let versions: &[&SupportedProtocolVersion] = match min_version {
        TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    let provider = store.provider.clone();
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Resolver(store)));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE_SIZE);
    // Stateless tickets: resumption without server-side state (keys rotate every 6 h).
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok(Arc::new(config))
}

fn build_map(sources: &[Source], provider: &CryptoProvider) -> Result<CertMap, TlsError> {
    let mut default = None;
    let mut exact = HashMap::new();
    let mut wildcard = HashMap::new();
    for source in sources {
        let key = Arc::new(load_pair(&source.cert, &source.key, provider)?);
        for name in &source.names {
            let name = name.to_ascii_lowercase();
            match name.strip_prefix("*.") {
                Some(parent) => wildcard.entry(parent.to_owned()),
                None => exact.entry(name),
            }
            .or_insert_with(|| key.clone());
        }
        // `tls.cert` comes first when set; otherwise the first of `tls.certificates`.
        default.get_or_insert(key);
    }
    let Some(default) = default else {
        return Err(TlsError::Pem {
            path: PathBuf::new(),
            what: "no certificate configured".to_owned(),
        });
    };
    Ok(CertMap {
        default,
        exact,
        wildcard,
    })
}

fn load_pair(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let pem = |path: &Path, what: &str| TlsError::Pem {
        path: path.to_owned(),
        what: what.to_owned(),
    };
    let chain = CertificateDer::pem_slice_iter(&read(cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(cert, &format!("not a PEM certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(pem(cert, "holds no CERTIFICATE block"));
    }
    let der = PrivateKeyDer::from_pem_slice(&read(key)?)
        .map_err(|e| pem(key, &format!("no PEM private key: {e}")))?;
    CertifiedKey::from_der(chain, der, provider).map_err(|source| TlsError::Key {
        cert: cert.to_owned(),
        key: key.to_owned(),
        source,
    })
}

/// A fresh self-signed certificate for `localhost`, `127.0.0.1` and `::1`; its
/// fingerprint is logged so `curl --pinnedpubkey`-style checks or a browser prompt can be
/// compared against it.
fn self_signed(provider: &CryptoProvider) -> Result<CertMap, TlsError> {
    let names = ["localhost", "127.0.0.1", "::1"]
        .map(str::to_owned)
        .to_vec();
    let made = rcgen::generate_simple_self_signed(names)?;
    let cert = made.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(made.signing_key.serialize_der().into());
    let certified = CertifiedKey::from_der(vec![cert.clone()], key, provider)?;
    tracing::warn!(
        sha256 = fingerprint(&cert),
        "No TLS certificate configured: serving a self-signed one for localhost."
    );
    Ok(CertMap {
        default: Arc::new(certified),
        exact: HashMap::new(),
        wildcard: HashMap::new(),
    })
}

/// SHA-256 of a certificate's DER, as colon-separated hex (as `openssl x509 -fingerprint`).
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
    let mut out = String::with_capacity(95);
    for (i, byte) in digest.as_ref().iter().enumerate() {
        if i > 0 {
            out.push(':');
        }
        let _ = write!(out, "{byte:02X}");
    }
    out
}

/// What identifies a file's content without reading it: a replaced file (rename, or the
/// symlink swap Kubernetes and ECS use for mounted secrets) changes at least one of these.
type Stamp = Vec<Option<(SystemTime, u64, u64)>>;

fn stamp(store: &CertStore) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    store
        .files()
        .map(|path| {
            std::fs::metadata(path)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len(), m.ino())))
        })
        .collect()
}

/// Reloads `store` on SIGHUP, and when a file changes, checked every `interval` (zero:
/// only on SIGHUP). Runs until the task is dropped.
///
/// Polling rather than inotify (`notify`): a stat of two files a second costs nothing,
/// and it sees what inotify misses — files on network and overlay mounts, and the
/// `..data` symlink swap of mounted secrets, which replaces a directory rather than
/// writing the file being watched.
///
/// # Errors
/// The SIGHUP handler cannot be installed.
pub fn watch(
    store: Arc<CertStore>,
    interval: Duration,
) -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    let mut hangup = signal(SignalKind::hangup())?;
    Ok(async move {
        if store.sources.is_empty() {
            // A self-signed certificate has no files; still swallow SIGHUP, whose default
            // action would end the process.
            while hangup.recv().await.is_some() {
                tracing::info!("SIGHUP: no certificate files to reload.");
            }
            return;
        }
        let mut seen = stamp(&store);
        let mut tick = (!interval.is_zero()).then(|| {
            let mut t = tokio::time::interval(interval);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        loop {
            let why = tokio::select! {
                Some(()) = hangup.recv() => "SIGHUP",
                _ = async { tick.as_mut()?.tick().await; Some(()) }, if tick.is_some() => {
                    let now = stamp(&store);
                    if now == seen {
                        continue;
                    }
                    seen = now;
                    "file change"
                }
                else => return,
            };
            match store.reload() {
                Ok(()) => {
                    let sha256 = store.current().default_leaf().map(|c| fingerprint(c));
                    tracing::info!(trigger = why, sha256, "TLS certificates reloaded.");
                }
                Err(error) => tracing::error!(
                    trigger = why,
                    %error,
                    "TLS certificate reload failed; still serving the previous certificates."
                ),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(tag: &str) -> Arc<CertifiedKey> {
        let provider = rustls::crypto::ring::default_provider();
        let made = rcgen::generate_simple_self_signed(vec![tag.to_owned()]).unwrap();
        let der = PrivateKeyDer::Pkcs8(made.signing_key.serialize_der().into());
        Arc::new(CertifiedKey::from_der(vec![made.cert.der().clone()], der, &provider).unwrap())
    }

    #[test]
    fn lookup_prefers_exact_then_wildcard_then_default() {
        let (default, exact, wild) = (key("d"), key("e"), key("w"));
        let map = CertMap {
            default: default.clone(),
            exact: HashMap::from([("api.example.com".to_owned(), exact.clone())]),
            wildcard: HashMap::from([("example.com".to_owned(), wild.clone())]),
        };
        assert!(Arc::ptr_eq(&map.lookup(Some("API.example.com.")), &exact));
        assert!(Arc::ptr_eq(&map.lookup(Some("www.example.com")), &wild));
        // A wildcard covers one label only.
        assert!(Arc::ptr_eq(&map.lookup(Some("a.b.example.com")), &default));
        assert!(Arc::ptr_eq(&map.lookup(Some("example.com")), &default));
        assert!(Arc::ptr_eq(&map.lookup(None), &default));
    }

    #[test]
    fn fingerprints_are_colon_separated_sha256() {
        let f = fingerprint(&CertificateDer::from(vec![1, 2, 3]));
        assert_eq!(f.len(), 95);
        assert!(f.starts_with("03:90:58:C6:F2:C0:CB:49"), "{f}");
    }
}
