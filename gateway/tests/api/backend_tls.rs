//! TLS to the backends, against a PostgreSQL (`ssl = on`) and a redis-server
//! (`--tls-port`) started here for the test, with certificates from a test CA. Both are
//! stopped when the test ends, pass or fail (their guards' `Drop`).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use app_core::ErrorChain;
use app_core::cache::l2::L2;
use app_core::store::Database;
use tiergate_config::{DatabaseSettings, RedisSettings, Secret};

use crate::helpers::closed_port;
use crate::tls::TestCa;

/// The newest `/usr/lib/postgresql/<version>/bin` (Debian's layout) with an `initdb`.
fn pg_bin() -> Option<PathBuf> {
    let mut bins: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    bins.sort();
    bins.pop().map(|(_, bin)| bin)
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A throw-away PostgreSQL cluster that accepts only TLS connections from 127.0.0.1.
struct TlsPostgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
}

impl TlsPostgres {
    /// `None` when this machine has no PostgreSQL server binaries.
    fn start(ca: &TestCa) -> Option<Self> {
        let Some(bin) = pg_bin() else {
            eprintln!("SKIPPED: no /usr/lib/postgresql/*/bin/initdb");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        // initdb refuses to run as root: the cluster belongs to `postgres`.
        run(Command::new("chown").arg("postgres:").arg(dir.path()));
        let as_postgres = |program: &str| {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(bin.join(program));
            cmd
        };
        run(as_postgres("initdb")
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data));
        let server = ca.issue("pg", &["localhost"]);
        std::fs::copy(&server.cert, data.join("server.crt")).unwrap();
        std::fs::copy(&server.key, data.join("server.key")).unwrap();
        run(Command::new("chown")
            .arg("postgres:")
            .arg(data.join("server.crt"))
            .arg(data.join("server.key")));
        run(Command::new("chmod")
            .arg("600")
            .arg(data.join("server.key")));
        let port = closed_port();
        let conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nfsync = off\n",
            dir.path().display()
        );
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        std::io::Write::write_all(&mut file, conf.as_bytes()).unwrap();
        // TLS or nothing: a plain connection is rejected, so a success proves TLS.
        std::fs::write(
            data.join("pg_hba.conf"),
            "hostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n",
        )
        .unwrap();
        let pg = Self {
            bin: bin.clone(),
            data,
            port,
            _dir: dir,
        };
        run(as_postgres("pg_ctl")
            .args(["-w", "-t", "30", "-l"])
            .arg(pg.data.join("log"))
            .arg("-D")
            .arg(&pg.data)
            .arg("start"));
        Some(pg)
    }

    fn settings(&self, host: &str, sslmode: &str, ca_file: Option<PathBuf>) -> DatabaseSettings {
        DatabaseSettings {
            url: Secret::new(format!(
                "postgres://postgres@{host}:{}/postgres?sslmode={sslmode}",
                self.port
            )),
            ca_file,
            connect_timeout: Duration::from_secs(3),
            ..DatabaseSettings::default()
        }
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-m", "immediate", "-w", "-D"])
            .arg(&self.data)
            .arg("stop")
            .stdout(Stdio::null())
            .output();
    }
}

async fn ping(settings: &DatabaseSettings) -> Result<(), String> {
    let db = Database::new(settings).map_err(|e| e.to_string())?;
    // Outside the pool: a pool checkout only says it timed out.
    db.check_connect()
        .await
        .map_err(|e| ErrorChain(&e).to_string())?;
    db.ping()
        .await
        .map(drop)
        .map_err(|e| ErrorChain(&e).to_string())
}

#[tokio::test]
async fn postgres_over_tls_verify_full_passes_and_a_wrong_host_name_fails_clearly() {
    let ca = TestCa::new();
    let Some(pg) = TlsPostgres::start(&ca) else {
        return;
    };
    let ca_file = Some(ca.write_ca());

    ping(&pg.settings("localhost", "verify-full", ca_file.clone()))
        .await
        .unwrap();
    ping(&pg.settings("127.0.0.1", "verify-ca", ca_file.clone()))
        .await
        .unwrap();
    // Unverified encryption, as libpq's require and prefer.
    ping(&pg.settings("127.0.0.1", "require", None))
        .await
        .unwrap();
    ping(&pg.settings("127.0.0.1", "prefer", None))
        .await
        .unwrap();

    // The certificate is for localhost, not 127.0.0.1.
    let err = ping(&pg.settings("127.0.0.1", "verify-full", ca_file.clone()))
        .await
        .unwrap_err();
    assert!(err.contains("not valid for name"), "{err}");
    assert!(!err.contains("postgres://"), "the URL leaked: {err}");

    // Another CA's bundle: the chain does not verify.
    let other = TestCa::new();
    let err = ping(&pg.settings("localhost", "verify-full", Some(other.write_ca())))
        .await
        .unwrap_err();
    assert!(err.contains("invalid peer certificate"), "{err}");

    // Plain TCP is refused by this server: the successes above were over TLS.
    let err = ping(&pg.settings("127.0.0.1", "disable", None))
        .await
        .unwrap_err();
    assert!(err.contains("no encryption"), "{err}");
}

#[tokio::test]
async fn postgres_verify_modes_need_a_readable_ca_file() {
    let settings = DatabaseSettings {
        url: Secret::new("postgres://u:hunter2@localhost/db?sslmode=verify-full"),
        ca_file: Some(PathBuf::from("/nonexistent/rds-bundle.pem")),
        ..DatabaseSettings::default()
    };
    let err = Database::new(&settings).unwrap_err().to_string();
    assert!(
        err.starts_with("database.ca_file: cannot read /nonexistent/rds-bundle.pem"),
        "{err}"
    );
    assert!(!err.contains("hunter2"));
}

/// A redis-server with only a TLS port, killed on drop.
struct TlsRedis {
    child: Child,
    port: u16,
}

impl TlsRedis {
    fn start(ca: &TestCa) -> Option<Self> {
        let help = Command::new("redis-server").arg("--help").output();
        if help.is_err() {
            eprintln!("SKIPPED: redis-server is not installed");
            return None;
        }
        let server = ca.issue("redis", &["localhost"]);
        let port = closed_port();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .arg("--tls-cert-file")
            .arg(&server.cert)
            .arg("--tls-key-file")
            .arg(&server.key)
            .arg("--tls-ca-cert-file")
            .arg(ca.write_ca())
            .args([
                "--tls-auth-clients",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--bind", "127.0.0.1"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let redis = Self { child, port };
        // Ready once the port accepts connections.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(redis)
    }

    fn settings(&self, host: &str, ca_file: Option<PathBuf>) -> RedisSettings {
        RedisSettings {
            url: Secret::new(format!("rediss://{host}:{}", self.port)),
            ca_file,
            ..RedisSettings::default()
        }
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn redis_over_tls_with_a_ca_file() {
    let ca = TestCa::new();
    let Some(redis) = TlsRedis::start(&ca) else {
        return;
    };
    let l2 = L2::connect(
        &redis.settings("localhost", Some(ca.write_ca())),
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(
        l2.wait_connected(Duration::from_secs(10)).await,
        "no TLS connection"
    );
    l2.ping().await.unwrap();
    l2.quit().await;

    // The wrong name, or a CA that did not sign the certificate: no connection.
    let other = TestCa::new();
    for settings in [
        redis.settings("127.0.0.1", Some(ca.write_ca())),
        redis.settings("localhost", Some(other.write_ca())),
    ] {
        let l2 = L2::connect(&settings, Duration::from_secs(5)).unwrap();
        assert!(!l2.wait_connected(Duration::from_secs(1)).await);
        l2.quit().await;
    }
}
