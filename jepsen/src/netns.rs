//! The network between regions as Linux network namespaces: each `quiverd` runs in its own
//! namespace (a *host*), joined to the others by veth links on one bridge in the root
//! namespace (where the clients, and a sharded run's etcd, run). Used when running as root with `ip netns`, `nft` and `tc`
//! available (`apt-get install nftables`); otherwise the harness falls back to loopback
//! proxies ([`crate::proxy`]).
//!
//! Faults are kernel rules inside the receiver's namespace, on its input chain, matching only
//! other hosts' addresses (clients, and etcd, keep reaching every node):
//! - a partition drops what a host receives from another (one way) or both hosts' (both);
//! - packet loss drops a fraction of other hosts' packets (`numgen random`);
//! - a bandwidth cap is a token bucket on the host's interface (`tc qdisc ... tbf`).
//!
//! The kernel here has no netem, so there is no added latency; delay, duplication and
//! reordering of messages come from the pullers' test-only chaos mode.

use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};

/// Runs a command, returning its stderr on failure.
fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Whether namespaces can be used here: root, and `ip`, `nft` and `tc` work.
pub fn available() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    root && run(&["ip", "netns", "list"]).is_ok() && run(&["nft", "--version"]).is_ok() && run(&["tc", "-V"]).is_ok()
}

/// The namespaces, bridge and links of one run (removed on drop).
#[derive(Debug)]
pub struct Netns {
    id: u32,
    /// The hosts, numbered 1..=253 (the last byte of their address).
    hosts: Vec<u32>,
}

impl Netns {
    fn ns(&self, host: u32) -> String {
        format!("qj{:x}n{host}", self.id)
    }

    fn bridge(&self) -> String {
        format!("qj{:x}br", self.id)
    }

    fn veth(&self, host: u32) -> String {
        format!("qj{:x}v{host}", self.id)
    }

    /// The address of `host` (0: the bridge, where clients run).
    pub fn ip(&self, host: u32) -> IpAddr {
        let host = if host == 0 { 254 } else { host as u8 };
        IpAddr::V4(Ipv4Addr::new(10, 201, (self.id % 250) as u8, host))
    }

    /// Creates a namespace per host (each in 1..=253) on a new bridge.
    pub fn create(hosts: &[u32]) -> Result<Netns, String> {
        if let Some(h) = hosts.iter().find(|&&h| h == 0 || h > 253) {
            return Err(format!("host {h} is not in 1..=253"));
        }
        let id = std::process::id() % 0xfff;
        let n = Netns { id, hosts: hosts.to_vec() };
        // Leftovers of an earlier run with the same id.
        n.remove();
        let br = n.bridge();
        run(&["ip", "link", "add", &br, "type", "bridge"])?;
        run(&["ip", "addr", "add", &format!("{}/24", n.ip(0)), "dev", &br])?;
        run(&["ip", "link", "set", &br, "up"])?;
        for &r in hosts {
            let ns = n.ns(r);
            let veth = n.veth(r);
            let inner = format!("{veth}i");
            run(&["ip", "netns", "add", &ns])?;
            run(&["ip", "link", "add", &veth, "type", "veth", "peer", "name", &inner])?;
            run(&["ip", "link", "set", &inner, "netns", &ns])?;
            run(&["ip", "link", "set", &veth, "master", &br])?;
            run(&["ip", "link", "set", &veth, "up"])?;
            run(&["ip", "netns", "exec", &ns, "ip", "link", "set", "lo", "up"])?;
            run(&["ip", "netns", "exec", &ns, "ip", "link", "set", &inner, "name", "eth0"])?;
            run(&["ip", "netns", "exec", &ns, "ip", "addr", "add", &format!("{}/24", n.ip(r)), "dev", "eth0"])?;
            run(&["ip", "netns", "exec", &ns, "ip", "link", "set", "eth0", "up"])?;
            run(&["ip", "netns", "exec", &ns, "nft", "add", "table", "inet", "quiver"])?;
            run(&[
                "ip",
                "netns",
                "exec",
                &ns,
                "nft",
                "add chain inet quiver input { type filter hook input priority 0; policy accept; }",
            ])?;
        }
        Ok(n)
    }

    /// The command prefix that runs a program inside `host`'s namespace.
    pub fn exec_prefix(&self, host: u32) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), self.ns(host)]
    }

    fn nft(&self, host: u32, rule: &str) -> Result<(), String> {
        run(&["ip", "netns", "exec", &self.ns(host), "nft", rule])
    }

    /// `receiver` stops hearing `sender` (a one-way partition, on `receiver`'s input chain).
    pub fn block(&self, receiver: u32, sender: u32) -> Result<(), String> {
        self.nft(receiver, &format!("add rule inet quiver input ip saddr {} drop", self.ip(sender)))
    }

    /// Every host loses `permille`/1000 of the other hosts' packets and sends at most
    /// `rate_kbit`.
    pub fn flaky(&self, permille: u32, rate_kbit: u32) -> Result<(), String> {
        for &r in &self.hosts {
            let peers: Vec<String> = self.hosts.iter().filter(|&&o| o != r).map(|&o| self.ip(o).to_string()).collect();
            self.nft(
                r,
                &format!(
                    "add rule inet quiver input ip saddr {{ {} }} numgen random mod 1000 < {permille} drop",
                    peers.join(", ")
                ),
            )?;
            run(&[
                "ip",
                "netns",
                "exec",
                &self.ns(r),
                "tc",
                "qdisc",
                "add",
                "dev",
                "eth0",
                "root",
                "tbf",
                "rate",
                &format!("{rate_kbit}kbit"),
                "burst",
                "32kbit",
                "latency",
                "400ms",
            ])?;
        }
        Ok(())
    }

    /// Removes every rule and cap.
    pub fn heal(&self) -> Result<(), String> {
        for &r in &self.hosts {
            self.nft(r, "flush chain inet quiver input")?;
            let _ = run(&["ip", "netns", "exec", &self.ns(r), "tc", "qdisc", "del", "dev", "eth0", "root"]);
        }
        Ok(())
    }

    fn remove(&self) {
        for &r in &self.hosts {
            let _ = run(&["ip", "netns", "del", &self.ns(r)]);
            let _ = run(&["ip", "link", "del", &self.veth(r)]);
        }
        let _ = run(&["ip", "link", "del", &self.bridge()]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.remove();
    }
}
