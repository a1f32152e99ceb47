//! The `quiverd` processes of a run: one per region, or (a sharded run) several per region
//! sharing its slots through one etcd (`server/CLUSTER.md`). Without network namespaces they
//! listen on loopback ports and every replication link goes through its own [`Link`] proxy;
//! in namespaces each node is a host of its own (a sharded run needs them: its nodes find
//! each other at the addresses they advertise, which a proxy per link cannot stand in for).
//! Clients talk to the nodes directly.
//!
//! The nodes run as in production: TLS on every connection, regions authenticating each other
//! by certificate (mutual TLS, the region named in the certificate) and clients by a bearer
//! token. [`Security`] makes the CA, the certificates and the token file for each run.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use quiver_testkit::etcd::Etcd;
use quiver_testkit::quiverd;

use crate::netns::Netns;
use crate::proxy::Link;

/// How the cluster is set up.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Regions, numbered 1..=n.
    pub regions: u32,
    /// Nodes per region: 1 is an unsharded region; more share the region's slots through etcd.
    pub shards: u32,
    /// Clock skew per region in milliseconds (test-only clock offset).
    pub skew_ms: BTreeMap<u32, i64>,
    /// Seed of the pullers' message chaos (`None`: off).
    pub chaos_seed: Option<u64>,
    /// Retained replication log per node, MiB (small, so a lagging peer must bootstrap).
    pub replication_log_mb: u64,
    /// Each node's `--memory-budget-mb` (an eighth of it bounds the requests in flight).
    pub memory_budget_mb: u64,
}

/// One node.
#[derive(Debug)]
pub struct Node {
    /// Its region.
    pub region: u32,
    /// Its place in its region, `0..shards`.
    pub shard: u32,
    /// Its name (`r{region}n{shard}`): its node id in a sharded region, and the name of its
    /// certificate, data directory and log.
    pub id: String,
    /// Its gRPC address.
    pub addr: SocketAddr,
    /// Its host in the network namespaces: `region + 10 * shard`.
    host: u32,
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
    /// A CA, a certificate per node (for its address, naming its region) and a token file,
    /// under `dir`.
    fn create(dir: &Path, nodes: &[Node]) -> Result<Security, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let pki = quiver_testkit::pki::Pki::new("quiver jepsen CA")?;
        let ca_pem = pki.ca_pem();
        std::fs::write(dir.join("ca.crt"), &ca_pem).map_err(|e| format!("ca.crt: {e}"))?;
        for n in nodes {
            pki.write(dir, &n.id, Some(n.region), &[n.addr.ip()])?;
        }
        use quiver_server::auth::{Rates, Scope, TokenFile};
        let mut tokens = TokenFile::default();
        let scopes = vec![Scope::Read, Scope::Write, Scope::Registry, Scope::Admin];
        let token = tokens.create("jepsen", scopes, Vec::new(), None, Rates::default())?;
        tokens.save(&dir.join("tokens.toml"))?;
        Ok(Security { ca_pem, token, dir: dir.to_path_buf() })
    }

    /// quiverd's flags for node `id`.
    fn args(&self, id: &str) -> Vec<String> {
        let path = |name: String| self.dir.join(name).to_string_lossy().into_owned();
        vec![
            "--tls-cert".into(),
            path(format!("{id}.crt")),
            "--tls-key".into(),
            path(format!("{id}.key")),
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
    /// Every node: region 1's shards, then region 2's, ... (see [`Cluster::index`]).
    pub nodes: Vec<Node>,
    /// The network.
    pub net: Net,
    /// Certificates and the clients' token.
    pub security: Security,
    /// The etcd of a sharded run (each region a cluster of its own in it).
    pub etcd: Option<Etcd>,
    spec: ClusterSpec,
    quiverd: PathBuf,
}

impl Cluster {
    /// Starts every node under `dir` and waits until each listens; in network namespaces
    /// when `netns` (see [`crate::netns::available`]), else on loopback behind proxies. A
    /// sharded spec needs namespaces, and starts etcd on their bridge.
    pub async fn start(spec: ClusterSpec, dir: &Path, netns: bool) -> Result<Cluster, String> {
        let quiverd = quiverd::path()?;
        let sharded = spec.shards > 1;
        if sharded && !netns {
            return Err("a sharded run needs network namespaces (root, with ip, nft and tc)".into());
        }
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let shape: Vec<(u32, u32)> =
            (1..=spec.regions).flat_map(|r| (0..spec.shards.max(1)).map(move |k| (r, k))).collect();
        let ns = match netns {
            true => Some(Netns::create(&shape.iter().map(|&(r, k)| r + 10 * k).collect::<Vec<_>>())?),
            false => None,
        };
        let mut nodes = Vec::new();
        for (region, shard) in shape {
            let host = region + 10 * shard;
            let addr: SocketAddr = match &ns {
                Some(n) => SocketAddr::new(n.ip(host), NETNS_PORT),
                None => format!("127.0.0.1:{}", quiverd::free_port()?).parse().map_err(|e| format!("{e}"))?,
            };
            let id = format!("r{region}n{shard}");
            nodes.push(Node {
                region,
                shard,
                addr,
                host,
                data_dir: dir.join(&id),
                log: dir.join(format!("{id}.log")),
                id,
                child: None,
                stopped: false,
            });
        }
        let etcd = match (&ns, sharded) {
            (Some(n), true) => Some(Etcd::start_on(n.ip(0), dir)?),
            _ => None,
        };
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
        let mut c = Cluster { nodes, net, security, etcd, spec, quiverd };
        for i in 0..c.nodes.len() {
            c.start_node(i)?;
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

    /// Nodes per region.
    pub fn shards(&self) -> u32 {
        self.spec.shards.max(1)
    }

    /// The index in [`Cluster::nodes`] of `region`'s node `shard`.
    pub fn index(&self, region: u32, shard: u32) -> usize {
        ((region - 1) * self.shards() + shard) as usize
    }

    /// The hosts of `region`'s nodes.
    fn hosts(&self, region: u32) -> impl Iterator<Item = u32> + '_ {
        self.nodes.iter().filter(move |n| n.region == region).map(|n| n.host)
    }

    /// Where `puller`'s nodes reach `origin` (its first node: the seed of a sharded region's
    /// members).
    fn peer_addr(&self, puller: u32, origin: u32) -> String {
        match &self.net {
            Net::Proxy(links) => links[&(puller, origin)].addr.to_string(),
            Net::Netns(_) => self.nodes[self.index(origin, 0)].addr.to_string(),
        }
    }

    /// `puller`'s nodes stop hearing `origin`'s (until healed).
    pub fn block(&self, puller: u32, origin: u32) -> Result<(), String> {
        match &self.net {
            Net::Proxy(links) => {
                links[&(puller, origin)].faults.set_blocked(true);
                Ok(())
            }
            Net::Netns(n) => {
                for p in self.hosts(puller) {
                    for o in self.hosts(origin) {
                        n.block(p, o)?;
                    }
                }
                Ok(())
            }
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
                Ok("flaky links: 2% of packets between nodes dropped (nft numgen), 2 Mbit/s cap (tc tbf)")
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

    /// Starts (or restarts) node `i` on its data directory and port.
    pub fn start_node(&mut self, i: usize) -> Result<(), String> {
        let region = self.nodes[i].region;
        let peers: Vec<String> = (1..=self.spec.regions)
            .filter(|&o| o != region)
            .map(|o| format!("{o}={}", self.peer_addr(region, o)))
            .collect();
        let prefix = match &self.net {
            Net::Netns(n) => n.exec_prefix(self.nodes[i].host),
            Net::Proxy(_) => Vec::new(),
        };
        let quiverd = self.quiverd.clone();
        let security = self.security.args(&self.nodes[i].id);
        let skew = self.spec.skew_ms.get(&region).copied();
        let chaos = self.spec.chaos_seed.map(|s| s + u64::from(region) + 100 * u64::from(self.nodes[i].shard));
        let (log_mb, memory_mb) = (self.spec.replication_log_mb, self.spec.memory_budget_mb);
        let etcd = self.etcd.as_ref().map(|e| e.url.clone());
        let node = &mut self.nodes[i];
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
            .args(["--listen", &node.addr.to_string(), "--metrics-listen", "off"])
            .args(["--memory-budget-mb", &memory_mb.to_string()])
            .args(["--region", &region.to_string(), "--replication-log-mb", &log_mb.to_string()])
            .args(["--durability", "sync"])
            // TLS, mutual TLS between regions, tokens for clients (see `Security`).
            .args(&security)
            .env("RUST_LOG", "warn,quiver_server::replication=info,quiver_server::moving=info")
            .stderr(log);
        for p in &peers {
            cmd.args(["--peer", p]);
        }
        if let Some(url) = etcd {
            // Each region is a cluster of its own in the one etcd.
            cmd.args(["--etcd", &url, "--node-id", &node.id, "--cluster", &format!("jepsen-r{region}")]);
        }
        if let Some(ms) = skew {
            cmd.env("QUIVER_TEST_CLOCK_SKEW_MS", ms.to_string());
        }
        if let Some(seed) = chaos {
            cmd.env("QUIVER_TEST_REPLICATION_CHAOS", seed.to_string());
        }
        let (child, _) =
            quiverd::start(&mut cmd).map_err(|e| format!("node {}: {e} (see {})", node.id, node.log.display()))?;
        node.child = Some(child);
        node.stopped = false;
        Ok(())
    }

    fn signal(&mut self, i: usize, sig: i32) {
        if let Some(c) = &self.nodes[i].child {
            // SAFETY: kill(2) on the pid of a child this process started and has not reaped.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    /// SIGKILL node `i`: the process dies with whatever it had not synced.
    pub fn kill(&mut self, i: usize) {
        let node = &mut self.nodes[i];
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

    /// SIGSTOP node `i`: the process freezes (a long GC pause, a stalled VM).
    pub fn pause(&mut self, i: usize) {
        self.signal(i, libc::SIGSTOP);
        self.nodes[i].stopped = true;
    }

    /// SIGCONT node `i`.
    pub fn resume(&mut self, i: usize) {
        self.signal(i, libc::SIGCONT);
        self.nodes[i].stopped = false;
    }

    /// Heals the network, resumes etcd and paused nodes, and restarts dead ones.
    pub fn heal(&mut self) -> Result<(), String> {
        self.heal_network()?;
        if let Some(etcd) = &self.etcd {
            etcd.signal("CONT")?;
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].stopped {
                self.resume(i);
            }
            if self.nodes[i].child.is_none() {
                self.start_node(i)?;
            }
        }
        Ok(())
    }

    /// Stops every node gracefully (SIGTERM), waiting at most `timeout` each.
    pub fn stop(&mut self, timeout: Duration) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].stopped {
                self.resume(i);
            }
            self.signal(i, libc::SIGTERM);
            if let Some(mut c) = self.nodes[i].child.take() {
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
