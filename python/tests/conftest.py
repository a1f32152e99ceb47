"""Fixtures: a real quiverd (the build's binary) started once per session on a free loopback
port with a fresh data directory, and the registry the tests share.

The binary is ``$QUIVERD``, else ``target/debug/quiverd`` of this checkout (``cargo build -p
quiver-server`` makes it; ``cargo test --workspace`` runs these tests through
``tests/tests/python_sdk.rs`` with ``QUIVERD`` set). The CLI (for tokens and the CLI/SDK
registry check) is ``$QUIVER_CLI``, else ``target/debug/quiver``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import quiver

REPO = Path(__file__).resolve().parents[2]
LISTENING = "quiverd listening on "

REGISTRY = """
[[entity_types]]
name = "user"
join_keys = [{ name = "user_id", type = "string" }]

[[entity_types]]
name = "account"
join_keys = [{ name = "bank", type = "string" }, { name = "number", type = "int64" }]

[[feature_groups]]
name = "user_stats"
entity_type = "user"
owner = "growth@example.com"
ttl = "2h"
tags = { team = "growth" }
[[feature_groups.features]]
name = "clicks"
type = "int64"
default = 0
[[feature_groups.features]]
name = "spend"
type = "float64"
[[feature_groups.features]]
name = "country"
type = "string"
default = "unknown"

[[feature_groups]]
name = "all_types"
entity_type = "user"
ttl = "0s"
[[feature_groups.features]]
name = "b"
type = "bool"
[[feature_groups.features]]
name = "i"
type = "int64"
[[feature_groups.features]]
name = "f32"
type = "float32"
[[feature_groups.features]]
name = "f64"
type = "float64"
[[feature_groups.features]]
name = "s"
type = "string"
[[feature_groups.features]]
name = "raw"
type = "bytes"
[[feature_groups.features]]
name = "emb"
type = "float32_vector"
dim = 3
[[feature_groups.features]]
name = "ids"
type = "int64_list"
[[feature_groups.features]]
name = "tags"
type = "string_list"

[[feature_groups]]
name = "balances"
entity_type = "account"
ttl = "1d"
[[feature_groups.features]]
name = "balance"
type = "float64"
"""


def binary(env: str, name: str) -> Path:
    path = Path(os.environ.get(env) or REPO / "target" / "debug" / name)
    if not path.exists():
        pytest.fail(f"{path} not found: build it with `cargo build -p quiver-server -p quiver-tools`, or set {env}")
    return path


@dataclass
class Daemon:
    process: subprocess.Popen[str]
    address: str
    data_dir: Path
    # The web UI's base URL ("http://127.0.0.1:PORT"), when quiverd serves it.
    ui: str | None = None
    # The Prometheus endpoint ("http://127.0.0.1:PORT/metrics"), when quiverd serves it.
    metrics: str | None = None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_quiverd(
    data_dir: Path,
    *extra: str,
    listen: str = "127.0.0.1:0",
    env: dict[str, str] | None = None,
    metrics_listen: str = "off",
) -> Daemon:
    proc = subprocess.Popen(
        [
            str(binary("QUIVERD", "quiverd")),
            "--data-dir",
            str(data_dir),
            "--listen",
            listen,
            "--metrics-listen",
            metrics_listen,
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(LISTENING):
        proc.kill()
        proc.wait()
        pytest.fail(f"quiverd did not start: first line {line!r}")
    address = line[len(LISTENING) :].split(",")[0].strip()
    # "..., ui http://HOST:PORT/" or "..., ui off"
    ui = line.rsplit(", ui ", 1)[1].strip().rstrip("/") if ", ui http://" in line else None
    # "..., metrics http://HOST:PORT/metrics, ui ..." or "..., metrics off, ..."
    metrics = line.split(", metrics ", 1)[1].split(",", 1)[0].strip() if ", metrics http://" in line else None
    return Daemon(proc, address, data_dir, ui, metrics)


def metric(daemon: Daemon, name: str) -> float:
    """One unlabelled sample of the daemon's Prometheus endpoint."""
    assert daemon.metrics is not None, "quiverd was started without metrics"
    text = urllib.request.urlopen(daemon.metrics, timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not among {daemon.metrics}'s samples")


def wait_for_requests_in_flight(daemon: Daemon, n: int, timeout: float = 30.0) -> None:
    """Until the daemon counts `n` data requests in flight (quiver_requests_in_flight)."""
    deadline = time.monotonic() + timeout
    while metric(daemon, "quiver_requests_in_flight") != n:
        assert time.monotonic() < deadline, f"quiverd did not reach {n} data requests in flight in {timeout} s"
        time.sleep(0.02)


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_quiverd(tmp_path_factory.mktemp("quiverd"))
    yield d
    d.stop()


@pytest.fixture(scope="session")
def registry_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("registry") / "registry.toml"
    path.write_text(REGISTRY)
    return path


@pytest.fixture(scope="session", params=["flight", "grpc"])
def client(request: pytest.FixtureRequest, daemon: Daemon, registry_file: Path) -> Iterator[quiver.Client]:
    """A client on the shared server, once with Arrow Flight for training sets and writes (the
    default) and once on the protobuf API alone: every test using it runs on both."""
    with quiver.Client(daemon.address, use_flight=request.param == "flight") as q:
        q.apply(registry_file)
        yield q


@pytest.fixture
def uid() -> str:
    """A prefix that keeps one test's entities apart from the others' on the shared server."""
    return uuid.uuid4().hex[:8]


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(binary("QUIVER_CLI", "quiver")), *args], capture_output=True, text=True, check=check)


@pytest.fixture(scope="session")
def secured(tmp_path_factory: pytest.TempPathFactory, registry_file: Path) -> Iterator[tuple[Daemon, dict[str, str]]]:
    d = tmp_path_factory.mktemp("secured")
    tokens_file = d / "tokens.toml"
    tokens = {}
    for name, scopes in (("admin", ["registry", "read", "write"]), ("reader", ["read"])):
        args = ["auth", "create", "--file", str(tokens_file), "--name", name]
        for s in scopes:
            args += ["--scope", s]
        tokens[name] = cli(*args).stdout.strip()
    daemon = start_quiverd(d / "data", "--auth", "tokens", "--auth-tokens", str(tokens_file))
    with quiver.Client(daemon.address, token=tokens["admin"]) as q:
        q.apply(registry_file)
    yield daemon, tokens
    daemon.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def region(tmp_path_factory: pytest.TempPathFactory, registry_file: Path) -> Iterator[list[Daemon]]:
    """A sharded region: a real etcd (``$QUIVER_TEST_ETCD``, else ``etcd`` on the PATH; Debian
    etcd-server, which ``.ci/run`` installs) and two quiverd nodes started with
    ``--no-forward``, the registry applied to both and the slot map created; then a third node,
    ``gw``, that joins after the map is made (so owns no slots) and forwards everything: a
    gateway. Yields ``[a, b, gw]``."""
    etcd_bin = os.environ.get("QUIVER_TEST_ETCD") or shutil.which("etcd")
    if etcd_bin is None:
        pytest.fail("etcd not found: install etcd-server, or set QUIVER_TEST_ETCD")
    d = tmp_path_factory.mktemp("region")
    client_port, peer_port = free_port(), free_port()
    url = f"http://127.0.0.1:{client_port}"
    etcd = subprocess.Popen(
        [
            etcd_bin,
            "--data-dir",
            str(d / "etcd"),
            "--listen-client-urls",
            url,
            "--advertise-client-urls",
            url,
            "--listen-peer-urls",
            f"http://127.0.0.1:{peer_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    nodes: list[Daemon] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                    if json.load(r).get("health") == "true":
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "etcd did not become healthy"
            time.sleep(0.1)
        for node in ("a", "b"):
            args = ["--etcd", url, "--node-id", node, "--cluster", "py", "--no-forward"]
            nodes.append(start_quiverd(d / node, *args))
        for n in nodes:
            with quiver.Client(n.address) as q:
                q.apply(registry_file)
        while True:
            status = json.loads(cli("--addr", f"http://{nodes[0].address}", "--json", "cluster", "status").stdout)
            if sum(1 for n in status["nodes"] if n["live"]) == 2:
                break
            assert time.monotonic() < deadline, f"both nodes never registered: {status}"
            time.sleep(0.1)
        cli("--addr", f"http://{nodes[0].address}", "cluster", "init")
        nodes.append(start_quiverd(d / "gw", "--etcd", url, "--node-id", "gw", "--cluster", "py"))
        with quiver.Client(nodes[2].address) as q:
            q.apply(registry_file)
        for n in nodes:
            while not json.loads(cli("--addr", f"http://{n.address}", "--json", "cluster", "status").stdout)["runs"]:
                assert time.monotonic() < deadline, "a node never saw the map"
                time.sleep(0.1)
        yield nodes
    finally:
        for n in nodes:
            n.stop()
        etcd.terminate()
        etcd.wait(timeout=20)
