//! Three (or more) `quiverd` processes, one per region, on loopback ports; every replication
//! link goes through its own [`Link`] proxy. Clients talk to their region's node directly.
//!
//! The nodes run as in production: TLS on every connection, regions authenticating each other
//! by certificate (mutual TLS, the region named in the certificate) and clients by a bearer
//! token. [`Security`] makes the CA, the certificates and the token file for each run.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use quiver_testkit::quiverd;

use crate::netns::Netns;
use crate::proxy::Link;

/// How the cluster is set up.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Regions, numbered 1..=n.
    pub regions: u32,
    /// Clock skew per region in milliseconds (test-only clock offset).
    pub skew_ms: BTreeMap<u32, i64>,
    /// Seed of the pullers' message chaos (`None`: off).
    pub chaos_seed: Option<u64>,
    /// Retained replication log per node, MiB (small, so a lagging peer must bootstrap).
    pub replication_log_mb: u64,
}

/// One region's node.
#[derive(Debug)]
pub struct Node {
    /// Its region.
    pub region: u32,
    /// Its gRPC address.
    pub addr: SocketAddr,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    stopped: bool,
}

/// How regions reach each other.
#[derive(Debug)]
pub enum Net {
    /// Loopback ports, a proxy per (puller, origin) link.
    Proxy(BTreeMap<(u32, u32), Link>),
    /// A network namespace per region on a bridge, faults as nftables and tc rules.
    Netns(Netns),
}

/// What the cluster's nodes and clients authenticate with (made fresh for each run).
#[derive(Debug, Clone)]
pub struct Security {
    /// The CA certificate, PEM (clients trust it).
    pub ca_pem: String,
    /// The clients' bearer token (scopes read, write, registry, admin).
    pub token: String,
    dir: PathBuf,
}

impl Security {
    /// A CA, a certificate per region (for its address and 127.0.0.1, naming the region) and
    /// a token file, under `dir`.
    fn create(dir: &Path, nodes: &[Node]) -> Result<Security, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let pki = quiver_testkit::pki::Pki::new("quiver jepsen CA")?;
        let ca_pem = pki.ca_pem();
        std::fs::write(dir.join("ca.crt"), &ca_pem).map_err(|e| format!("ca.crt: {e}"))?;
        for n in nodes {
            pki.write(dir, &format!("region-{}", n.region), Some(n.region), &[n.addr.ip()])?;
        }
        use quiver_server::auth::{Rates, Scope, TokenFile};
        let mut tokens = TokenFile::default();
        let scopes = vec![Scope::Read, Scope::Write, Scope::Registry, Scope::Admin];
        let token = tokens.create("jepsen", scopes, Vec::new(), None, Rates::default())?;
        tokens.save(&dir.join("tokens.toml"))?;
        Ok(Security { ca_pem, token, dir: dir.to_path_buf() })
    }

    /// quiverd's flags for region `region`.
    fn args(&self, region: u32) -> Vec<String> {
        let path = |name: String| self.dir.join(name).to_string_lossy().into_owned();
        vec![
            "--tls-cert".into(),
            path(format!("region-{region}.crt")),
            "--tls-key".into(),
            path(format!("region-{region}.key")),
            "--tls-ca".into(),
            path("ca.crt".into()),
            "--auth-tokens".into(),
            path("tokens.toml".into()),
        ]
    }
}

/// Port every node listens on inside its namespace.
const NETNS_PORT: u16 = 7000;

/// The cluster.
#[derive(Debug)]
pub struct Cluster {
    /// Nodes by region - 1.
    pub nodes: Vec<Node>,
    /// The network.
    pub net: Net,
    /// Certificates and the clients' token.
    pub security: Security,
    spec: ClusterSpec,
    quiverd: PathBuf,
}

impl Cluster {
    /// Starts every node under `dir` and waits until each listens; in network namespaces
    /// when `netns` (see [`crate::netns::available`]), else on loopback behind proxies.
    pub async fn start(spec: ClusterSpec, dir: &Path, netns: bool) -> Result<Cluster, String> {
        let quiverd = quiverd::path()?;
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let ns = if netns { Some(Netns::create(spec.regions)?) } else { None };
        let mut nodes = Vec::new();
        for region in 1..=spec.regions {
            let addr: SocketAddr = match &ns {
                Some(n) => SocketAddr::new(n.ip(region), NETNS_PORT),
                None => format!("127.0.0.1:{}", quiverd::free_port()?).parse().map_err(|e| format!("{e}"))?,
            };
            nodes.push(Node {
                region,
                addr,
                data_dir: dir.join(format!("region-{region}")),
                log: dir.join(format!("region-{region}.log")),
                child: None,
                stopped: false,
            });
        }
        let net = match ns {
            Some(n) => Net::Netns(n),
            None => {
                let mut links = BTreeMap::new();
                for puller in 1..=spec.regions {
                    for origin in 1..=spec.regions {
                        if puller != origin {
                            let target = nodes[(origin - 1) as usize].addr;
                            let link = Link::start(target, u64::from(puller * 31 + origin))
                                .await
                                .map_err(|e| format!("proxy: {e}"))?;
                            links.insert((puller, origin), link);
                        }
                    }
                }
                Net::Proxy(links)
            }
        };
        let security = Security::create(&dir.join("security"), &nodes)?;
        let mut c = Cluster { nodes, net, security, spec, quiverd };
        for region in 1..=c.spec.regions {
            c.start_node(region)?;
        }
        Ok(c)
    }

    /// "proxy" or "netns".
    pub fn network(&self) -> &'static str {
        match self.net {
            Net::Proxy(_) => "loopback + fault-injecting proxies",
            Net::Netns(_) => "network namespaces + nftables/tc",
        }
    }

    /// Where `puller` reaches `origin`.
    fn peer_addr(&self, puller: u32, origin: u32) -> String {
        match &self.net {
            Net::Proxy(links) => links[&(puller, origin)].addr.to_string(),
            Net::Netns(_) => self.nodes[(origin - 1) as usize].addr.to_string(),
        }
    }

    /// `puller` stops hearing `origin` (until healed).
    pub fn block(&self, puller: u32, origin: u32) -> Result<(), String> {
        match &self.net {
            Net::Proxy(links) => {
                links[&(puller, origin)].faults.set_blocked(true);
                Ok(())
            }
            Net::Netns(n) => n.block(puller, origin),
        }
    }

    /// Every link degrades: packet loss and a bandwidth cap (and latency, through proxies).
    pub fn flaky(&self) -> Result<&'static str, String> {
        match &self.net {
            Net::Proxy(links) => {
                for l in links.values() {
                    l.faults.set_delay(Duration::from_millis(15));
                    l.faults.set_rate(256 << 10);
                    l.faults.set_loss_ppm(20_000);
                }
                Ok("flaky links: 15 ms per chunk, 256 KiB/s cap, 2% of chunks cut the connection")
            }
            Net::Netns(n) => {
                n.flaky(20, 2048)?;
                Ok("flaky links: 2% of peer packets dropped (nft numgen), 2 Mbit/s cap (tc tbf)")
            }
        }
    }

    fn heal_network(&self) -> Result<(), String> {
        match &self.net {
            Net::Proxy(links) => {
                for l in links.values() {
                    l.faults.heal();
                }
                Ok(())
            }
            Net::Netns(n) => n.heal(),
        }
    }

    fn node(&mut self, region: u32) -> &mut Node {
        &mut self.nodes[(region - 1) as usize]
    }

    /// Starts (or restarts) one node on its data directory and port.
    pub fn start_node(&mut self, region: u32) -> Result<(), String> {
        let peers: Vec<String> = (1..=self.spec.regions)
            .filter(|&o| o != region)
            .map(|o| format!("{o}={}", self.peer_addr(region, o)))
            .collect();
        let prefix = match &self.net {
            Net::Netns(n) => n.exec_prefix(region),
            Net::Proxy(_) => Vec::new(),
        };
        let quiverd = self.quiverd.clone();
        let security = self.security.args(region);
        let skew = self.spec.skew_ms.get(&region).copied();
        let chaos = self.spec.chaos_seed.map(|s| s + u64::from(region));
        let log_mb = self.spec.replication_log_mb;
        let node = self.node(region);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .map_err(|e| format!("{}: {e}", node.log.display()))?;
        let mut cmd = match prefix.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(quiverd);
                c
            }
            None => Command::new(quiverd),
        };
        cmd.arg("--data-dir")
            .arg(&node.data_dir)
            .args(["--listen", &node.addr.to_string(), "--metrics-listen", "off", "--memory-budget-mb", "64"])
            .args(["--region", &region.to_string(), "--replication-log-mb", &log_mb.to_string()])
            .args(["--durability", "sync"])
            // TLS, mutual TLS between regions, tokens for clients (see `Security`).
            .args(&security)
            .env("RUST_LOG", "warn,quiver_server::replication=info")
            .stderr(log);
        for p in &peers {
            cmd.args(["--peer", p]);
        }
        if let Some(ms) = skew {
            cmd.env("QUIVER_TEST_CLOCK_SKEW_MS", ms.to_string());
        }
        if let Some(seed) = chaos {
            cmd.env("QUIVER_TEST_REPLICATION_CHAOS", seed.to_string());
        }
        let (child, _) =
            quiverd::start(&mut cmd).map_err(|e| format!("region {region}: {e} (see {})", node.log.display()))?;
        node.child = Some(child);
        node.stopped = false;
        Ok(())
    }

    fn signal(&mut self, region: u32, sig: i32) {
        if let Some(c) = &self.node(region).child {
            // SAFETY: kill(2) on the pid of a child this process started and has not reaped.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    /// SIGKILL: the process dies with whatever it had not synced.
    pub fn kill(&mut self, region: u32) {
        let node = self.node(region);
        if let Some(mut c) = node.child.take() {
            if node.stopped {
                // SAFETY: as in `signal`.
                unsafe {
                    libc::kill(c.id() as i32, libc::SIGCONT);
                }
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        node.stopped = false;
    }

    /// SIGSTOP: the process freezes (a long GC pause, a stalled VM).
    pub fn pause(&mut self, region: u32) {
        self.signal(region, libc::SIGSTOP);
        self.node(region).stopped = true;
    }

    /// SIGCONT.
    pub fn resume(&mut self, region: u32) {
        self.signal(region, libc::SIGCONT);
        self.node(region).stopped = false;
    }

    /// Heals the network, resumes paused nodes and restarts dead ones.
    pub fn heal(&mut self) -> Result<(), String> {
        self.heal_network()?;
        for region in 1..=self.spec.regions {
            if self.node(region).stopped {
                self.resume(region);
            }
            if self.node(region).child.is_none() {
                self.start_node(region)?;
            }
        }
        Ok(())
    }

    /// Stops every node gracefully (SIGTERM), waiting at most `timeout` each.
    pub fn stop(&mut self, timeout: Duration) {
        for region in 1..=self.spec.regions {
            if self.node(region).stopped {
                self.resume(region);
            }
            self.signal(region, libc::SIGTERM);
            let node = self.node(region);
            if let Some(mut c) = node.child.take() {
                let deadline = Instant::now() + timeout;
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = c.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
