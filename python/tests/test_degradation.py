"""Client-side degradation for inference: the LRU cache and the fallback to registered
defaults when the server is unreachable or the deadline passes."""

from __future__ import annotations

import socket
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import Daemon, start_quiverd

import quiver

NOW = datetime.now(timezone.utc).replace(microsecond=0)
FEATURES = ["user_stats:clicks", "user_stats:spend"]


def test_cache_then_fallback_when_the_server_is_gone(tmp_path: Path, registry_file: Path) -> None:
    daemon = start_quiverd(tmp_path / "data")
    try:
        cache = quiver.OnlineCache(max_entries=1000, ttl=timedelta(minutes=5))
        short = quiver.OnlineCache(ttl=timedelta(milliseconds=200))
        q = quiver.Client(daemon.address, cache=cache, fallback=True, timeout=timedelta(seconds=5))
        q_short = quiver.Client(daemon.address, cache=short, fallback=True, timeout=timedelta(seconds=5))
        strict = quiver.Client(daemon.address, cache=cache, timeout=timedelta(seconds=5))
        q.apply(registry_file)
        q.write([{"user_id": "u1", "event_timestamp": NOW, "clicks": 5, "spend": 2.5}], "user_stats")

        first = q.get_online_features(FEATURES, [{"user_id": "u1"}, {"user_id": "u2"}]).to_dict()
        assert first["clicks"] == [5, 0] and first["spend"] == [2.5, None]
        assert first["spend__status"] == ["PRESENT", "NOT_FOUND"]
        assert len(cache) == 4
        hits = cache.hits
        again = q.get_online_features(FEATURES, [{"user_id": "u1"}, {"user_id": "u2"}])
        assert again.to_dict() == first and cache.hits == hits + 4 and not again.degraded
        q_short.get_online_features(FEATURES, [{"user_id": "u1"}])
        strict.get_online_features(FEATURES, [{"user_id": "u1"}])  # metadata known before the stop
        # A server that does not answer (the connection open, nothing coming back): at the
        # deadline the client answers u1 from the cache and u9 with defaults, instead of raising.
        with Proxy(daemon.address) as proxy, quiver.Client(proxy.address, cache=cache, fallback=True) as through:
            through._meta = q._meta  # the registry metadata q fetched (join keys, defaults)
            assert not through.get_online_features(FEATURES, [{"user_id": "u1"}, {"user_id": "u8"}]).degraded
            proxy.frozen.set()
            started = time.monotonic()
            late = through.get_online_features(FEATURES, [{"user_id": "u1"}, {"user_id": "u9"}], deadline=0.5)
            assert time.monotonic() - started < 5
        assert late.degraded, late.to_dict()
        assert late.to_dict()["clicks"] == [5, 0] and late.to_dict()["clicks__status"] == ["PRESENT", "DEFAULTED"]
        assert late.to_dict()["spend__status"] == ["PRESENT", "UNAVAILABLE"]

        daemon.stop()
        out = q.get_online_features(FEATURES, [{"user_id": "u1"}, {"user_id": "u3"}])
        d = out.to_dict()
        assert out.degraded
        # u1 from the cache, as served; u3: the registered default of clicks, nothing for spend.
        assert d["clicks"] == [5, 0] and d["clicks__status"] == ["PRESENT", "DEFAULTED"]
        assert d["spend"] == [2.5, None] and d["spend__status"] == ["PRESENT", "UNAVAILABLE"]
        assert d["spend__event_timestamp"][0] == NOW
        # The cached answers expire with their TTL.
        time.sleep(0.3)
        expired = q_short.get_online_features(FEATURES, [{"user_id": "u1"}]).to_dict()
        assert expired["clicks__status"] == ["DEFAULTED"] and expired["spend__status"] == ["UNAVAILABLE"]
        # Without fallback the failure is raised; a fully cached lookup still needs no server.
        with pytest.raises(quiver.QuiverUnavailable):
            strict.get_online_features(FEATURES, [{"user_id": "u3"}])
        assert strict.get_online_features(FEATURES, [{"user_id": "u1"}]).to_dict()["clicks"] == [5]
        # A client that never reached the server knows no join keys or defaults: it raises.
        with quiver.Client(daemon.address, fallback=True, timeout=timedelta(seconds=2)) as fresh:
            with pytest.raises(quiver.QuiverUnavailable):
                fresh.get_online_features(FEATURES, [{"user_id": "u1"}])
        for c in (q, q_short, strict):
            c.close()
    finally:
        daemon.stop()


class Proxy:
    """A TCP proxy to a server that can be frozen: it then holds every byte in both directions,
    so calls through it hang until their deadline (a server that accepted and went silent)."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.frozen = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data or self.frozen.is_set():
                if not data:
                    return
                continue  # frozen: swallowed
            try:
                dst.sendall(data)
            except OSError:
                return

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        for s in self.sockets:
            s.close()


def test_as_of_bypasses_the_cache(daemon: Daemon, client: quiver.Client, uid: str) -> None:
    cache = quiver.OnlineCache()
    with quiver.Client(daemon.address, cache=cache) as q:
        user = f"{uid}-c"
        q.write([{"user_id": user, "event_timestamp": NOW, "spend": 1.0}], "user_stats")
        q.get_online_features(["user_stats:spend"], [{"user_id": user}], as_of=NOW)
        assert len(cache) == 0
        q.get_online_features(["user_stats:spend"], [{"user_id": user}])
        assert len(cache) == 1
