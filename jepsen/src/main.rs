//! `quiver-jepsen`: runs the fault-injection test against real `quiverd` processes and writes
//! the history and summary to `--out`. Exits non-zero if the checker found a violation.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "quiver-jepsen",
    about = "Fault-injection test of a Quiver cluster: three regions, or two regions of two shards"
)]
struct Args {
    /// Output directory (history.jsonl, summary.json, node logs and data).
    #[arg(long, default_value = "jepsen-out")]
    out: PathBuf,
    /// Seconds of faults (the schedule repeats, on random regions, until they are over; 0
    /// runs each fault once: the short mode CI runs).
    #[arg(long, default_value_t = 0)]
    seconds: u64,
    /// Seconds each fault is held.
    #[arg(long, default_value_t = 3)]
    hold: u64,
    /// Seed of the workload, the nemesis and the pullers' message chaos.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Clients per region.
    #[arg(long, default_value_t = 2)]
    clients: u32,
    /// Two regions of two nodes sharing their slots through etcd, with slot moves (and
    /// nodes killed mid-move) among the faults; needs network namespaces and etcd.
    #[arg(long)]
    sharded: bool,
    /// No faults: a healthy run under the same workload (to measure replication lag).
    #[arg(long)]
    no_faults: bool,
    /// No message chaos and no skewed clock.
    #[arg(long)]
    no_chaos: bool,
    /// "auto" (network namespaces when root with ip/nft/tc, else proxies), "netns" or "proxy".
    #[arg(long, default_value = "auto")]
    network: String,
}

fn main() {
    let a = Args::parse();
    let network = match a.network.as_str() {
        "auto" => quiver_jepsen::Network::Auto,
        "netns" => quiver_jepsen::Network::Netns,
        "proxy" => quiver_jepsen::Network::Proxy,
        other => {
            eprintln!("quiver-jepsen: --network must be auto, netns or proxy, not {other:?}");
            std::process::exit(2);
        }
    };
    let cfg = quiver_jepsen::Config {
        hold: Duration::from_secs(a.hold.max(1)),
        duration: Duration::from_secs(a.seconds),
        seed: a.seed,
        clients: a.clients.clamp(1, 16),
        faults: !a.no_faults,
        chaos: !a.no_chaos,
        network,
        ..if a.sharded { quiver_jepsen::Config::sharded(a.out) } else { quiver_jepsen::Config::short(a.out) }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("quiver-jepsen: runtime: {e}");
            std::process::exit(2);
        }
    };
    match rt.block_on(quiver_jepsen::run(&cfg)) {
        Ok(s) => {
            println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
            eprintln!("quiver-jepsen: {}", s.shared_cas);
            eprintln!("quiver-jepsen: {} violations", s.violations.len());
            if !s.violations.is_empty() {
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("quiver-jepsen: {e}");
            std::process::exit(2);
        }
    }
}
