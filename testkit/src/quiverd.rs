//! The `quiverd` of this build, started for a test: where the binary is, and starting one and
//! reading the address it prints when it listens. Callers build the command line (flags,
//! environment, a prefix such as `ip netns exec`) and connect to the address themselves, so
//! this crate needs no gRPC stack.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// What `quiverd` prints first, once it listens.
pub const LISTENING: &str = "quiverd listening on ";

/// The `quiverd` binary of this build: `QUIVERD` if set, else next to the running executable
/// (`target/<profile>/deps/<test>` or `target/<profile>/<bin>` -> `target/<profile>/quiverd`).
/// `cargo test --workspace` builds it; a test of one package needs `cargo build -p
/// quiver-server` first.
pub fn path() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("QUIVERD") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| format!("the running executable's path: {e}"))?;
    for dir in exe.ancestors().skip(1).take(2) {
        let p = dir.join("quiverd");
        if p.exists() {
            return Ok(p);
        }
    }
    Err(format!(
        "quiverd not found next to {}: build it with `cargo build -p quiver-server` \
         (`cargo test --workspace` does), or set QUIVERD",
        exe.display()
    ))
}

/// A free loopback port (bound, read, released: another process could take it meanwhile).
pub fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("binding a loopback port: {e}"))?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

/// Where a started `quiverd` listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listening {
    /// The gRPC address, `host:port` (no scheme).
    pub addr: String,
    /// The metrics address, `host:port`, when metrics are on.
    pub metrics: Option<String>,
    /// The web UI's address, `host:port`, when the UI is on.
    pub ui: Option<String>,
}

/// Parses `quiverd listening on ADDR, data directory DIR, metrics http://HOST:PORT/metrics, ui
/// http://HOST:PORT/` (either may be `off`).
pub fn parse_listening(line: &str) -> Option<Listening> {
    let addr = line.strip_prefix(LISTENING)?.split(',').next()?.trim();
    if addr.is_empty() {
        return None;
    }
    let url = |label: &str, path: &str| {
        let (_, rest) = line.rsplit_once(&format!(", {label} http://"))?;
        let hostport = rest.split([',', '\n']).next()?.trim();
        Some(hostport.strip_suffix(path).unwrap_or(hostport).to_string())
    };
    Some(Listening { addr: addr.to_string(), metrics: url("metrics", "/metrics"), ui: url("ui", "/") })
}

/// Spawns `cmd` (a `quiverd` command line, perhaps behind a prefix) with its stdout piped here,
/// and waits for the line it prints once it listens. On anything else (it exited, or printed
/// something else first) the child is killed and reaped, and the error quotes what it printed.
pub fn start(cmd: &mut Command) -> Result<(Child, Listening), String> {
    let mut child = cmd.stdout(Stdio::piped()).spawn().map_err(|e| format!("starting quiverd: {e}"))?;
    let mut line = String::new();
    let read = match child.stdout.take() {
        Some(stdout) => BufReader::new(stdout).read_line(&mut line).map_err(|e| e.to_string()),
        None => Err("no stdout".to_string()),
    };
    match read.and_then(|_| parse_listening(&line).ok_or_else(|| format!("unexpected first line {line:?}"))) {
        Ok(listening) => Ok((child, listening)),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!("quiverd did not start: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_listening_line() {
        let l = parse_listening(
            "quiverd listening on 127.0.0.1:4001, data directory /tmp/a, b, metrics http://127.0.0.1:9464/metrics, ui \
             off\n",
        );
        let want = Listening { addr: "127.0.0.1:4001".into(), metrics: Some("127.0.0.1:9464".into()), ui: None };
        assert_eq!(l, Some(want));
        let l =
            parse_listening("quiverd listening on [::1]:7000, data directory /d, metrics off, ui http://[::1]:80/\n");
        assert_eq!(l, Some(Listening { addr: "[::1]:7000".into(), metrics: None, ui: Some("[::1]:80".into()) }));
        assert_eq!(parse_listening("error: no such directory\n"), None);
        assert_eq!(parse_listening(""), None);
    }

    #[test]
    fn a_process_that_prints_something_else_is_an_error() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo hello"]);
        let e = start(&mut cmd).expect_err("not quiverd");
        assert!(e.contains("hello"), "{e}");
    }
}
