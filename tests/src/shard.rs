//! A sharded region under test (server/CLUSTER.md): its nodes, and the slot function written
//! out from its definition.

use std::time::{Duration, Instant};

use quiver_proto::v1 as pb;

use crate::{Clients, Daemon, Etcd};

/// The slot of a one-string entity key, written here from its definition (CLUSTER.md §1: the
/// key's encoding, FNV-1a of the salt and the key, MurmurHash3's finaliser, the top 12 bits)
/// so that the test checks the server's function rather than reusing it.
pub fn slot_of_user(id: &str) -> u32 {
    let mut encoded = b"quiver/slot\0".to_vec();
    encoded.push(0x01);
    for &b in id.as_bytes() {
        encoded.push(b);
        if b == 0 {
            encoded.push(0xff);
        }
    }
    encoded.extend_from_slice(&[0x00, 0x01]);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in encoded {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    (h >> 52) as u32
}

/// A node of a sharded region under test.
pub struct Node {
    /// Its node id.
    pub id: String,
    /// The process.
    pub daemon: Daemon,
    /// Its clients.
    pub clients: Clients,
    /// Its cluster service.
    pub cluster: pb::cluster_service_client::ClusterServiceClient<tonic::transport::Channel>,
}

impl Node {
    /// Node `id` on the data directory `data` (under `dir`), with `extra` flags.
    pub async fn start(dir: &std::path::Path, data: &str, etcd: &Etcd, id: &str, extra: &[&str]) -> Node {
        let mut args = vec!["--etcd", &etcd.url, "--node-id", id, "--cluster", "e2e"];
        args.extend_from_slice(extra);
        let daemon = Daemon::start(&dir.join(data), &args);
        let clients = Clients::of(&daemon).await;
        let cluster = pb::cluster_service_client::ClusterServiceClient::new(daemon.channel().await);
        Node { id: id.to_string(), daemon, clients, cluster }
    }

    /// Its cluster status.
    pub async fn status(&self) -> pb::GetClusterStatusResponse {
        let mut c = self.cluster.clone();
        c.get_cluster_status(pb::GetClusterStatusRequest {}).await.expect("status").into_inner()
    }

    /// Waits (up to 30 s) until its status satisfies `done`.
    pub async fn wait_for(&self, what: &str, done: impl Fn(&pb::GetClusterStatusResponse) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.status().await;
            if done(&s) {
                return;
            }
            assert!(Instant::now() < deadline, "{}: timed out waiting for {what}: {s:?}", self.id);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
