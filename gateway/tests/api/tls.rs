//! The HTTPS listener: ALPN, SNI, protocol versions, reload, the self-signed fallback.
//! Certificates are made here, at test time, by a throw-away CA.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use app_core::tls::AnyCertificate;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use tiergate_config::{CertificateSettings, Settings, TlsVersion};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::helpers::TestApp;

/// A CA made for one test, and a directory for the files it issues.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pub dir: tempfile::TempDir,
}

/// PEM files of one issued certificate.
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub der: CertificateDer<'static>,
}

impl TestCa {
    pub fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Tiergate test CA");
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self {
            issuer,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn der(&self) -> CertificateDer<'static> {
        self.issuer.as_ref().der().clone()
    }

    /// Writes the CA certificate to `ca.pem` and returns its path.
    pub fn write_ca(&self) -> PathBuf {
        let path = self.dir.path().join("ca.pem");
        std::fs::write(&path, self.issuer.as_ref().pem()).unwrap();
        path
    }

    /// Issues a certificate for `names` and writes it as `{file}.crt` / `{file}.key`.
    pub fn issue(&self, file: &str, names: &[&str]) -> Issued {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let params = CertificateParams::new(names).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let issued = Issued {
            cert: self.dir.path().join(format!("{file}.crt")),
            key: self.dir.path().join(format!("{file}.key")),
            der: cert.der().clone(),
        };
        write_atomically(&issued.cert, cert.pem().as_bytes());
        write_atomically(&issued.key, key.serialize_pem().as_bytes());
        issued
    }
}

/// Writes through a temporary file and a rename, as deployment tools do, so a reader
/// never sees half a file.
pub fn write_atomically(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Settings with an HTTPS listener on port 0 and the default certificate `issued`.
pub fn https_settings(default: Option<&Issued>) -> Settings {
    let mut settings = Settings::for_tests();
    settings.listen.https = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    if let Some(issued) = default {
        settings.tls.cert = Some(issued.cert.clone());
        settings.tls.key = Some(issued.key.clone());
    }
    settings.tls.reload_interval = Duration::from_millis(50);
    settings
}

/// A rustls client trusting `roots` (none: trusts anything, for the self-signed case).
pub fn client_config(
    roots: Option<&CertificateDer<'static>>,
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .unwrap();
    let mut config = match roots {
        Some(ca) => {
            let mut store = rustls::RootCertStore::empty();
            store.add(ca.clone()).unwrap();
            builder.with_root_certificates(store).with_no_client_auth()
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate::new(provider)))
            .with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

pub async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    sni: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_owned()).unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// The leaf certificate the server presented.
pub fn served_leaf(tls: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}

/// Sends `GET path` over an HTTP/1.1 or HTTP/2 connection; returns status and version.
pub struct Http {
    h1: Option<hyper::client::conn::http1::SendRequest<Empty<Bytes>>>,
    h2: Option<hyper::client::conn::http2::SendRequest<Empty<Bytes>>>,
}

impl Http {
    pub async fn over(tls: TlsStream<TcpStream>) -> Self {
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let io = TokioIo::new(tls);
        if h2 {
            let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
            tokio::spawn(conn);
            Self {
                h1: None,
                h2: Some(send),
            }
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            Self {
                h1: Some(send),
                h2: None,
            }
        }
    }

    pub async fn get(&mut self, path: &str) -> (u16, http::Version) {
        let req = http::Request::get(format!("https://localhost{path}"))
            .header(http::header::HOST, "localhost")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let rsp = match (&mut self.h1, &mut self.h2) {
            (Some(h1), _) => {
                h1.ready().await.unwrap();
                h1.send_request(req).await.unwrap()
            }
            (_, Some(h2)) => {
                h2.ready().await.unwrap();
                h2.send_request(req).await.unwrap()
            }
            _ => unreachable!(),
        };
        let (status, version) = (rsp.status().as_u16(), rsp.version());
        let _ = rsp.into_body().collect().await.unwrap();
        (status, version)
    }
}

const BOTH: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Waits until a fresh handshake to `addr` presents `expected`.
async fn wait_for_leaf(addr: SocketAddr, ca: &TestCa, expected: &CertificateDer<'static>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let tls = tls_connect(addr, client_config(Some(&ca.der()), &[], BOTH), "localhost")
            .await
            .unwrap();
        if served_leaf(&tls) == *expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was not served within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn https_serves_http1_and_http2_chosen_by_alpn() {
    let ca = TestCa::new();
    let cert = ca.issue("default", &["localhost"]);
    let app = TestApp::start_unready(https_settings(Some(&cert))).await;
    let addr = app.https.unwrap();

    for (alpn, want) in [
        (&b"http/1.1"[..], http::Version::HTTP_11),
        (&b"h2"[..], http::Version::HTTP_2),
    ] {
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let config = client_config(Some(&ca.der()), &[alpn], &[version]);
            let tls = tls_connect(addr, config, "localhost").await.unwrap();
            assert_eq!(
                tls.get_ref().1.protocol_version(),
                Some(version.version),
                "negotiated version"
            );
            let mut http = Http::over(tls).await;
            // Two requests: the connection is kept alive between them.
            for _ in 0..2 {
                assert_eq!(http.get("/livez").await, (200, want));
            }
        }
    }
    // No ALPN at all: HTTP/1.1.
    let tls = tls_connect(addr, client_config(Some(&ca.der()), &[], BOTH), "localhost")
        .await
        .unwrap();
    assert_eq!(
        Http::over(tls).await.get("/livez").await,
        (200, http::Version::HTTP_11)
    );
    app.stop().await;
}

#[tokio::test]
async fn sni_picks_the_matching_certificate_else_the_default() {
    let ca = TestCa::new();
    let default = ca.issue("default", &["localhost"]);
    let api = ca.issue("api", &["api.example.test"]);
    let wild = ca.issue("wild", &["*.apps.example.test"]);
    let mut settings = https_settings(Some(&default));
    settings.tls.certificates = vec![
        CertificateSettings {
            cert: api.cert.clone(),
            key: api.key.clone(),
            server_names: vec!["api.example.test".to_owned()],
        },
        CertificateSettings {
            cert: wild.cert.clone(),
            key: wild.key.clone(),
            server_names: vec!["*.apps.example.test".to_owned()],
        },
    ];
    let app = TestApp::start_unready(settings).await;
    let addr = app.https.unwrap();
    let config = client_config(Some(&ca.der()), &[b"h2"], BOTH);

    for (sni, want) in [
        ("api.example.test", &api.der),
        ("shop.apps.example.test", &wild.der),
        ("localhost", &default.der),
    ] {
        // The client verifies the chain and the name, so a handshake that completes
        // proves the right certificate was chosen; the DER comparison says which.
        let tls = tls_connect(addr, config.clone(), sni).await.unwrap();
        assert_eq!(&served_leaf(&tls), want, "certificate for {sni}");
        assert_eq!(Http::over(tls).await.get("/livez").await.0, 200);
    }
    // An unknown name gets the default, which the client then refuses for that name.
    let err = tls_connect(addr, config, "other.example.test")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("certificate"), "{err}");
    app.stop().await;
}

#[tokio::test]
async fn min_version_1_3_refuses_a_tls_1_2_client() {
    let ca = TestCa::new();
    let cert = ca.issue("default", &["localhost"]);
    let mut settings = https_settings(Some(&cert));
    settings.tls.min_version = TlsVersion::V1_3;
    let app = TestApp::start_unready(settings).await;
    let addr = app.https.unwrap();
    let only12 = client_config(Some(&ca.der()), &[], &[&rustls::version::TLS12]);
    assert!(tls_connect(addr, only12, "localhost").await.is_err());
    let only13 = client_config(Some(&ca.der()), &[], &[&rustls::version::TLS13]);
    assert!(tls_connect(addr, only13, "localhost").await.is_ok());
    app.stop().await;
}

/// rustls cannot speak TLS 1.1, so this uses OpenSSL's client when it is installed
/// (`scripts/services` installs it). OpenSSL 3 disables TLS 1.1 at its default security
/// level, hence `@SECLEVEL=0`: the refusal must come from the server.
#[tokio::test]
async fn tls_1_1_and_1_0_are_refused() {
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: openssl is not installed");
        return;
    }
    let ca = TestCa::new();
    let cert = ca.issue("default", &["localhost"]);
    let app = TestApp::start_unready(https_settings(Some(&cert))).await;
    let addr = app.https.unwrap().to_string();
    let s_client = |flag: &'static str| {
        let addr = addr.clone();
        tokio::process::Command::new("openssl")
            .args(["s_client", "-connect", &addr, "-servername", "localhost"])
            .args([flag, "-cipher", "DEFAULT@SECLEVEL=0"])
            .stdin(std::process::Stdio::null())
            .output()
    };
    // The control: the same command with TLS 1.2 completes a handshake.
    let ok = s_client("-tls1_2").await.unwrap();
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(text.contains("Protocol  : TLSv1.2"), "{text}");
    for flag in ["-tls1_1", "-tls1"] {
        let out = s_client(flag).await.unwrap();
        assert!(!out.status.success(), "{flag} was accepted");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("Cipher is (NONE)") || text.contains("no peer certificate"),
            "{flag}: {text}"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn reload_swaps_the_certificate_and_open_connections_keep_working() {
    let ca = TestCa::new();
    let first = ca.issue("server", &["localhost"]);
    let app = TestApp::start_unready(https_settings(Some(&first))).await;
    let addr = app.https.unwrap();
    let config = client_config(Some(&ca.der()), &[b"http/1.1"], BOTH);

    let open = tls_connect(addr, config.clone(), "localhost")
        .await
        .unwrap();
    assert_eq!(served_leaf(&open), first.der);
    let mut open = Http::over(open).await;
    assert_eq!(open.get("/livez").await.0, 200);

    // Replace both files (the same paths), as a certificate renewal does.
    let second = ca.issue("server", &["localhost"]);
    assert_ne!(second.der, first.der);
    wait_for_leaf(addr, &ca, &second.der).await;

    // The connection made before the reload still works.
    assert_eq!(open.get("/livez").await.0, 200);
    app.stop().await;
}

#[tokio::test]
async fn a_broken_certificate_file_keeps_the_old_certificate() {
    let ca = TestCa::new();
    let good = ca.issue("server", &["localhost"]);
    let app = TestApp::start_unready(https_settings(Some(&good))).await;
    let addr = app.https.unwrap();
    let store = app.certs.clone().unwrap();

    // Garbage in the certificate file, then a key that belongs to another certificate.
    write_atomically(&good.cert, b"-----BEGIN CERTIFICATE-----\nnot base64\n");
    let err = store.reload().unwrap_err();
    assert!(err.to_string().contains("server.crt"), "{err}");
    let other = ca.issue("other", &["localhost"]);
    std::fs::copy(&other.cert, &good.cert).unwrap();
    let err = store.reload().unwrap_err();
    assert!(err.to_string().contains("server.key"), "{err}");
    // The watcher saw the same files; whatever it tried, the old certificate serves.
    for _ in 0..3 {
        let tls = tls_connect(addr, client_config(Some(&ca.der()), &[], BOTH), "localhost")
            .await
            .unwrap();
        assert_eq!(served_leaf(&tls), good.der);
        assert_eq!(Http::over(tls).await.get("/livez").await.0, 200);
    }
    // A good pair again is picked up.
    let fixed = ca.issue("server", &["localhost"]);
    wait_for_leaf(addr, &ca, &fixed.der).await;
    app.stop().await;
}

#[tokio::test]
async fn sighup_reloads_the_certificates() {
    let ca = TestCa::new();
    let first = ca.issue("server", &["localhost"]);
    let mut settings = https_settings(Some(&first));
    // No polling: only the signal can reload.
    settings.tls.reload_interval = Duration::ZERO;
    let app = TestApp::start_unready(settings).await;
    let addr = app.https.unwrap();
    // The server's handler is installed by now (bind returned), so SIGHUP cannot end the
    // test process; other servers in this process reload too, which is harmless.
    let second = ca.issue("server", &["localhost"]);
    let tls = tls_connect(addr, client_config(Some(&ca.der()), &[], BOTH), "localhost")
        .await
        .unwrap();
    assert_eq!(served_leaf(&tls), first.der, "no reload without the signal");
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    wait_for_leaf(addr, &ca, &second.der).await;
    app.stop().await;
}

#[tokio::test]
async fn without_a_certificate_a_self_signed_one_serves_localhost() {
    let app = TestApp::start_unready(https_settings(None)).await;
    let addr = app.https.unwrap();
    let tls = tls_connect(addr, client_config(None, &[b"h2"], BOTH), "localhost")
        .await
        .unwrap();
    let leaf = served_leaf(&tls);
    let store = app.certs.clone().unwrap();
    assert_eq!(Some(&leaf), store.current().default_leaf());
    assert_eq!(gateway::tls::fingerprint(&leaf).len(), 95);
    // It is valid for localhost: a client trusting it as a root accepts the name.
    let tls = tls_connect(addr, client_config(Some(&leaf), &[], BOTH), "localhost").await;
    assert!(tls.is_ok(), "{:?}", tls.err());
    assert_eq!(Http::over(tls.unwrap()).await.get("/livez").await.0, 200);
    app.stop().await;
}

#[tokio::test]
async fn a_silent_client_is_cut_at_the_handshake_timeout_and_counted() {
    use tokio::io::AsyncReadExt;

    let ca = TestCa::new();
    let cert = ca.issue("default", &["localhost"]);
    let mut settings = https_settings(Some(&cert));
    settings.tls.handshake_timeout = Duration::from_millis(300);
    let app = TestApp::start_unready(settings).await;
    let addr = app.https.unwrap();

    let mut silent = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0) | Err(_))), "{read:?}");
    let lasted = started.elapsed();
    assert!(lasted >= Duration::from_millis(250), "{lasted:?}");

    // A good handshake, then the counters and the open-connection gauge.
    let tls = tls_connect(
        addr,
        client_config(Some(&ca.der()), &[b"h2"], BOTH),
        "localhost",
    )
    .await
    .unwrap();
    let mut http = Http::over(tls).await;
    assert_eq!(http.get("/livez").await.0, 200);
    let metrics = app.metrics().await;
    for want in [
        r#"tiergate_tls_handshakes_total{listener="https",result="timeout",version="none"}"#,
        r#"tiergate_tls_handshakes_total{listener="https",result="ok",version="1.3"}"#,
        r#"tiergate_connections_rejected_total{listener="https",reason="tls_handshake"}"#,
        r#"tiergate_connections_open{listener="https"}"#,
    ] {
        assert!(metrics.contains(want), "{want} missing from:\n{metrics}");
    }
    app.stop().await;
}

#[tokio::test]
async fn http2_header_lists_over_the_limit_never_reach_the_service() {
    let ca = TestCa::new();
    let cert = ca.issue("default", &["localhost"]);
    let mut settings = https_settings(Some(&cert));
    settings.http.h2_max_header_list_bytes = 4096;
    let app = TestApp::start_unready(settings).await;
    let tls = tls_connect(
        app.https.unwrap(),
        client_config(Some(&ca.der()), &[b"h2"], BOTH),
        "localhost",
    )
    .await
    .unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("https://localhost/livez")
        .header("x-big", "a".repeat(8000))
        .body(Empty::<Bytes>::new())
        .unwrap();
    // h2 answers 431 itself; the service never sees the request.
    assert_eq!(send.send_request(req).await.unwrap().status(), 431);
    // The connection still serves requests within the limit.
    send.ready().await.unwrap();
    let ok = http::Request::get("https://localhost/livez")
        .body(Empty::<Bytes>::new())
        .unwrap();
    assert_eq!(send.send_request(ok).await.unwrap().status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn the_plain_listener_redirects_to_https_except_the_probes() {
    let ca = TestCa::new();
    let cert = ca.issue("default", &["localhost"]);
    let mut settings = https_settings(Some(&cert));
    settings.listen.redirect_to_https = true;
    let app = TestApp::start_unready(settings).await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let rsp = client
        .post(app.url("/items?x=1"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 308);
    let https_port = app.https.unwrap().port();
    assert_eq!(
        rsp.headers()["location"],
        format!("https://127.0.0.1:{https_port}/items?x=1").as_str()
    );
    for probe in ["/livez", "/readyz", "/health"] {
        let rsp = client.get(app.url(probe)).send().await.unwrap();
        assert_ne!(rsp.status(), 308, "{probe}");
    }
    app.stop().await;
}
