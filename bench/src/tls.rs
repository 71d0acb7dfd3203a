//! loadgen's TLS: a rustls client (ring provider, as the gateway uses) and [`Stream`],
//! the socket a connection reads and writes, plain or TLS.
//!
//! Session resumption is off unless asked for, so that `--new-conn` with TLS pays a full
//! handshake for every request (what a client without a session cache costs a server).

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::{Context as _, bail};
use app_core::tls::{AnyCertificate, roots};
use rustls::client::Resumption;
use rustls::{ClientConfig, HandshakeKind};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Where the system's CA bundle usually is (Debian, Ubuntu, Alpine).
const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Which server certificates to trust.
#[derive(Debug, Clone, Copy)]
pub enum Trust<'a> {
    /// The certificates of this PEM bundle (e.g. a self-signed certificate).
    Ca(&'a Path),
    /// The system's bundle: `SSL_CERT_FILE`, else `/etc/ssl/certs/ca-certificates.crt`.
    System,
    /// Any certificate (the handshake's signatures are still checked).
    Insecure,
}

/// How to speak TLS to the server: shared by every connection of a run.
#[derive(Debug, Clone)]
pub struct Tls {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    /// The ALPN protocol the server must pick (`h2` for HTTP/2), if any.
    must_pick: Option<&'static [u8]>,
}

/// How one handshake went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    /// Certificate, key exchange and all (with or without a HelloRetryRequest).
    Full,
    /// Resumed from an earlier session.
    Resumed,
}

impl Tls {
    /// A client for the server called `host` (a DNS name or an IP address, checked
    /// against its certificate and sent as SNI when a name), offering `alpn` only.
    ///
    /// # Errors
    /// `host` is not a valid server name, or the trusted bundle cannot be read or holds
    /// no certificate.
    pub fn new(
        host: &str,
        trust: Trust<'_>,
        alpn: &'static [u8],
        resume: bool,
    ) -> anyhow::Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?;
        let mut config = match trust {
            Trust::Insecure => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate::new(provider)))
                .with_no_client_auth(),
            Trust::Ca(path) => builder
                .with_root_certificates(roots(path).map_err(anyhow::Error::msg)?)
                .with_no_client_auth(),
            Trust::System => {
                let path = std::env::var_os("SSL_CERT_FILE")
                    .map_or_else(|| SYSTEM_BUNDLE.into(), std::path::PathBuf::from);
                let roots = roots(&path).map_err(anyhow::Error::msg).context(
                    "no trusted certificates: pass --ca FILE or --insecure, or set SSL_CERT_FILE",
                )?;
                builder.with_root_certificates(roots).with_no_client_auth()
            }
        };
        config.alpn_protocols = vec![alpn.to_vec()];
        if !resume {
            config.resumption = Resumption::disabled();
        }
        // `[::1]` in a URL is `::1` to the certificate.
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(bare.to_owned())
            .with_context(|| format!("'{host}' is not a valid TLS server name"))?;
        Ok(Self {
            config: Arc::new(config),
            name,
            must_pick: (alpn == b"h2").then_some(b"h2".as_slice()),
        })
    }

    /// Runs the handshake over `tcp`.
    ///
    /// # Errors
    /// The handshake fails (certificate refused, protocol error), or the server did not
    /// pick `h2` when HTTP/2 was asked for.
    pub async fn connect(&self, tcp: TcpStream) -> anyhow::Result<(Stream, Handshake)> {
        let tls = TlsConnector::from(self.config.clone())
            .connect(self.name.clone(), tcp)
            .await
            .context("TLS handshake")?;
        let session = tls.get_ref().1;
        if let Some(want) = self.must_pick
            && session.alpn_protocol() != Some(want)
        {
            bail!(
                "the server did not agree to {} by ALPN",
                String::from_utf8_lossy(want)
            );
        }
        let kind = match session.handshake_kind() {
            Some(HandshakeKind::Resumed) => Handshake::Resumed,
            _ => Handshake::Full,
        };
        Ok((Stream::Tls(Box::new(tls)), kind))
    }
}

/// A client socket: plain TCP or TLS over it. Both halves are `Unpin`, so the I/O
/// calls pass straight through.
#[derive(Debug)]
pub enum Stream {
    /// Plain TCP.
    Tcp(TcpStream),
    /// TLS over TCP (boxed: the session state is large).
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Tcp(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
