//! A single-member etcd for tests: the `etcd` binary on the PATH, or `QUIVER_TEST_ETCD`
//! (`.ci/run` installs Debian's `etcd-server`). The end-to-end tests run it on loopback;
//! jepsen's sharded mode on the address of its namespaces' bridge.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long [`Etcd::start_on`] waits for `/health` to answer.
pub const ETCD_START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running etcd, killed when dropped.
#[derive(Debug)]
pub struct Etcd {
    child: Child,
    /// Its client URL (`http://HOST:PORT`).
    pub url: String,
    /// Its data directory.
    pub dir: PathBuf,
}

impl Etcd {
    /// Starts one listening on `host` (free ports), with its data under `dir`, and waits until
    /// it answers `/health`.
    pub fn start_on(host: IpAddr, dir: &Path) -> Result<Etcd, String> {
        let bin = std::env::var("QUIVER_TEST_ETCD").unwrap_or_else(|_| "etcd".into());
        let (client, peer) = (crate::quiverd::free_port()?, crate::quiverd::free_port()?);
        let url = format!("http://{}", SocketAddr::new(host, client));
        let peer_url = format!("http://{}", SocketAddr::new(host, peer));
        let child = Command::new(&bin)
            .args(["--name", "test", "--data-dir"])
            .arg(dir.join("etcd"))
            .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("test={peer_url}"), "--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting {bin} (install etcd-server, or set QUIVER_TEST_ETCD): {e}"))?;
        let etcd = Etcd { child, url, dir: dir.to_path_buf() };
        let deadline = Instant::now() + ETCD_START_TIMEOUT;
        while !etcd.healthy() {
            if Instant::now() > deadline {
                return Err(format!("etcd did not answer /health at {}", etcd.url));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(etcd)
    }

    /// Whether `GET /health` answers `"health":"true"`.
    pub fn healthy(&self) -> bool {
        http_get(self.url.trim_start_matches("http://"), "/health").is_ok_and(|r| r.contains("\"health\":\"true\""))
    }

    /// Sends it `signal` (SIGSTOP, SIGCONT, ...).
    pub fn signal(&self, signal: &str) -> Result<(), String> {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .map_err(|e| format!("kill -{signal}: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("kill -{signal} {}: {status}", self.child.id()))
        }
    }

    /// Kills it (SIGKILL) and waits.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET path` over plain HTTP/1.1; the whole answer, headers included.
pub fn http_get(hostport: &str, path: &str) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect(hostport)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}
