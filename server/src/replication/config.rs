//! A node's region and its peers, and the transport its pullers connect with.

use std::pin::Pin;
use std::sync::Arc;

use super::PEERS_MAX;
use super::REGION_ID_MAX;

/// Opens a channel to a peer's address (a test's simulated network, for instance).
pub type Connect = Arc<
    dyn Fn(String) -> Pin<Box<dyn std::future::Future<Output = Result<tonic::transport::Channel, String>> + Send>>
        + Send
        + Sync,
>;

/// How a replicator reaches its peers and runs engine calls. The default is TCP and tokio's
/// blocking pool; a deterministic simulation swaps in its network and runs engine calls
/// inline (its engine lives in memory).
#[derive(Clone, Default)]
pub struct Transport {
    /// Opens channels to peers (`None`: TCP).
    pub connect: Option<Connect>,
    /// Run engine calls on the calling task instead of the blocking pool.
    pub inline_engine: bool,
    /// Test-only: pullers disorder what they receive, from this seed
    /// ([`CHAOS_ENV`](super::CHAOS_ENV); quiverd sets it only in builds with `testing`).
    pub chaos_seed: Option<u64>,
    /// The token pullers present to peers (a `replication` token for this node's region).
    pub token: crate::auth::BearerToken,
    /// TLS toward peers (their certificates verified, this node's presented); `None`: plaintext.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("connect", &self.connect.as_ref().map(|_| "custom"))
            .field("inline_engine", &self.inline_engine)
            .field("chaos_seed", &self.chaos_seed)
            .field("token", &"(secret)")
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// One peer: its region and its gRPC address (`host:port` or `http://host:port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its region.
    pub region: u32,
    /// Where its `ReplicationService` listens.
    pub address: String,
}

impl std::str::FromStr for Peer {
    type Err = String;

    /// `REGION=ADDRESS`, for example `2=10.0.0.7:50051`.
    fn from_str(s: &str) -> Result<Peer, String> {
        let (r, a) = s.split_once('=').ok_or_else(|| format!("peer {s:?} is not REGION=HOST:PORT"))?;
        let region = r.trim().parse::<u32>().map_err(|_| format!("peer {s:?}: region {r:?} is not a number"))?;
        let address = a.trim();
        if address.is_empty() {
            return Err(format!("peer {s:?} has no address"));
        }
        let address = if address.contains("://") { address.to_string() } else { format!("http://{address}") };
        Ok(Peer { region, address })
    }
}

/// The stream id of node `node` of a sharded region (`server/CLUSTER.md` §7): a 63-bit hash of
/// its id, never [`quiver_storage::SOLE_STREAM`] (the stream of a node that is not sharded).
pub fn stream_of(node: &str) -> quiver_storage::StreamId {
    let h =
        quiver_storage::hash::stable_hash64_salted(b"quiver/stream\0", node.as_bytes()) & quiver_storage::STREAM_MAX;
    h.max(1)
}

/// This node's place in a cluster.
#[derive(Debug, Clone, Default)]
pub struct ClusterConfig {
    /// This node's region.
    pub region: u32,
    /// Its peers (none: a single-region node).
    pub peers: Vec<Peer>,
}

impl ClusterConfig {
    /// Checks region ids and peers.
    pub fn check(&self) -> Result<(), String> {
        if self.region > REGION_ID_MAX {
            return Err(format!("region must be 0 to {REGION_ID_MAX}, not {}", self.region));
        }
        if self.peers.len() > PEERS_MAX {
            return Err(format!("at most {PEERS_MAX} peers"));
        }
        for (i, p) in self.peers.iter().enumerate() {
            if p.region > REGION_ID_MAX {
                return Err(format!("peer region must be 0 to {REGION_ID_MAX}, not {}", p.region));
            }
            if p.region == self.region {
                return Err(format!("peer {} has this node's own region", p.address));
            }
            if self.peers[..i].iter().any(|o| o.region == p.region) {
                return Err(format!("region {} is given twice as a peer", p.region));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_stable_distinct_and_never_the_sole_one() {
        assert_eq!(stream_of("n1"), stream_of("n1"));
        assert_ne!(stream_of("n1"), stream_of("n2"));
        for n in ["", "a", "node-7"] {
            let s = stream_of(n);
            assert!(s != quiver_storage::SOLE_STREAM && s <= quiver_storage::STREAM_MAX, "{n}: {s}");
        }
    }

    #[test]
    fn peers_parse_and_are_checked() {
        let p: Peer = "2=127.0.0.1:5000".parse().expect("peer");
        assert_eq!(p, Peer { region: 2, address: "http://127.0.0.1:5000".into() });
        for bad in ["2", "x=host:1", "2="] {
            assert!(bad.parse::<Peer>().is_err(), "{bad}");
        }
        let ok = |region, peers: Vec<Peer>| ClusterConfig { region, peers }.check();
        assert!(ok(1, vec![p.clone()]).is_ok());
        assert!(ok(2, vec![p.clone()]).is_err(), "own region");
        assert!(ok(1, vec![p.clone(), p.clone()]).is_err(), "twice");
        assert!(ok(REGION_ID_MAX + 1, vec![]).is_err(), "region too large");
    }
}
