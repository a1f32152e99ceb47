//! Connections and stopping, against a real quiverd: a bound on open connections, a stop that
//! ends open streams with UNAVAILABLE and is not held up by silent sockets, and what was
//! acknowledged before the stop is still there after it.

use std::time::{Duration, Instant};

use quiver_e2e::{example_registry, int, key, ts, Clients, Daemon};
use quiver_proto::v1 as pb;
use tonic::Code;

fn row(user: &str, clicks: i64) -> pb::WriteRow {
    pb::WriteRow {
        entity: Some(key(user)),
        group: "user_stats".into(),
        event_time: ts(1_000_000),
        values: [("clicks".to_string(), int(clicks))].into_iter().collect(),
        ..Default::default()
    }
}

/// Alice's clicks as a lookup at event time 1 s + 1 µs sees them.
async fn alice_clicks(c: &mut Clients) -> Vec<i64> {
    let req = pb::GetOnlineFeaturesRequest {
        entity_type: "user".into(),
        entities: vec![key("alice")],
        features: vec!["user_stats:clicks".into()],
        as_of: ts(1_000_001),
        ..Default::default()
    };
    c.features.get_online_features(req).await.expect("lookup").into_inner().columns.swap_remove(0).int64_values
}

/// Sends SIGTERM and waits for the exit: (clean exit, how long it took).
fn stop(d: Daemon) -> (bool, Duration) {
    let t = Instant::now();
    let ok = d.stop();
    (ok, t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_ends_open_streams_and_is_not_held_by_silent_sockets() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = Daemon::start(tmp.path(), &["--shutdown-timeout-ms", "3000"]);
    let mut c = Clients::of(&d).await;
    c.registry.apply_registry(example_registry()).await.expect("apply");
    let addr = d.addr.trim_start_matches("http://").to_string();

    // A socket that never sends a byte, and a write stream left open after one message.
    let _silent = std::net::TcpStream::connect(&addr).expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::WriteFeaturesRequest>(4);
    let mut writer = c.features.clone();
    let stream =
        tokio::spawn(
            async move { writer.write_features_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await },
        );
    tx.send(pb::WriteFeaturesRequest { rows: vec![row("alice", 7)], ..Default::default() }).await.expect("send");
    // The message is applied before the stop (a lookup sees it).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if alice_clicks(&mut c).await == vec![7] {
            break;
        }
        assert!(Instant::now() < deadline, "the streamed write never became visible");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let data_dir = d.data_dir.clone();
    let (clean, took) = tokio::task::spawn_blocking(move || stop(d)).await.expect("stop");
    assert!(clean, "quiverd exits cleanly");
    assert!(
        took < Duration::from_secs(8),
        "the stop took {took:?}: it must not wait on a silent socket or an open stream"
    );
    let ended = stream.await.expect("stream task").expect_err("the open stream ends with an error");
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert!(ended.message().contains("first 1 messages were applied"), "{}", ended.message());
    drop(tx);

    // What the stream wrote before the stop is there after a restart; an idle stop is quick.
    let d = Daemon::start(&data_dir, &[]);
    let mut c = Clients::of(&d).await;
    assert_eq!(alice_clicks(&mut c).await, vec![7]);
    drop(c);
    let (clean, took) = tokio::task::spawn_blocking(move || stop(d)).await.expect("stop");
    assert!(clean);
    eprintln!("idle stop took {took:?}");
    assert!(took < Duration::from_secs(2), "an idle stop took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_are_closed_at_once() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = Daemon::start(tmp.path(), &["--max-connections", "2"]);
    let addr = d.addr.trim_start_matches("http://").to_string();
    let first = std::net::TcpStream::connect(&addr).expect("connect");
    let second = std::net::TcpStream::connect(&addr).expect("connect");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A third connection is accepted and closed: the gRPC call fails.
    let ch = tonic::transport::Channel::from_shared(d.addr.clone()).expect("uri").connect_lazy();
    let mut c = pb::admin_service_client::AdminServiceClient::new(ch);
    let refused = c.get_stats(pb::GetStatsRequest {}).await.expect_err("over the connection limit");
    // The client sees the closed connection as UNAVAILABLE, UNKNOWN or CANCELLED, by timing.
    assert!(matches!(refused.code(), Code::Unavailable | Code::Unknown | Code::Cancelled), "{refused:?}");
    // Once one closes, connections are served again.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut c = loop {
        let ch = tonic::transport::Channel::from_shared(d.addr.clone()).expect("uri").connect_lazy();
        let mut c = pb::admin_service_client::AdminServiceClient::new(ch);
        if c.get_stats(pb::GetStatsRequest {}).await.is_ok() {
            break c;
        }
        assert!(Instant::now() < deadline, "a freed connection slot was never reused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    c.get_stats(pb::GetStatsRequest {}).await.expect("served");
    drop(second);
    let refused_total = d.metric("quiver_connections_refused_total");
    assert!(refused_total >= 1, "the refused connection is counted");
    assert!(d.stop());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_speaks_is_closed_after_the_first_bytes_timeout() {
    use std::io::Read;
    let tmp = tempfile::tempdir().expect("tmp");
    let d = Daemon::start(tmp.path(), &[]);
    let addr = d.addr.trim_start_matches("http://").to_string();
    let started = Instant::now();
    // A silent socket, and one that sent the HTTP/2 preface and then fell silent.
    let mut silent = std::net::TcpStream::connect(&addr).expect("connect");
    let mut spoke = std::net::TcpStream::connect(&addr).expect("connect");
    std::io::Write::write_all(&mut spoke, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").expect("preface");
    let closed = tokio::task::spawn_blocking(move || {
        silent.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let mut buf = [0u8; 64];
        // The server sends nothing to a client that sent nothing: the read ends at the close.
        loop {
            match silent.read(&mut buf) {
                Ok(0) => return Ok(Instant::now()),
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(Instant::now()),
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("join")
    .expect("the silent connection is closed, not left open");
    let after = closed.duration_since(started);
    // quiverd's FIRST_BYTES_TIMEOUT is 10 s.
    assert!(after >= Duration::from_secs(9), "closed after {after:?}, before the timeout");
    let silent_closed = d.metric("quiver_connections_silent_closed_total");
    assert_eq!(silent_closed, 1, "only the connection that never spoke is closed for silence");
    // The one that spoke is still open (HTTP/2 keepalive looks after it from then on).
    spoke.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    let mut buf = [0u8; 256];
    let n = spoke.read(&mut buf).expect("the server answered the preface with its SETTINGS");
    assert!(n > 0);
    drop(spoke);
    assert!(d.stop());
}
