"""The web UI (quiverd --ui-listen) in a real headless browser (Debian's chromium and
chromium-driver, driven by Selenium), and its JSON API over plain HTTP.

A quiverd with tokens, the served-feature log on and the UI on loopback gets a registry (with a
staged second version of a group), writes, online lookups and a drift baseline; then every page
is opened through the sign-in form and checked for what the test put there, with no error in
the browser's console. A screenshot of each page is written to ``$QUIVER_TEST_OUTPUT/ui``
(default ``target/test-output/ui`` of this checkout).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import REGISTRY, REPO, Daemon, binary, cli, start_quiverd
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

import quiver

NOW = datetime.now(timezone.utc)
OUTPUT = Path(os.environ.get("QUIVER_TEST_OUTPUT") or REPO / "target" / "test-output") / "ui"
WAIT_S = 20
SAMPLE_MS = 200

# A second version of user_stats (one more feature), applied without promotion: staged.
STAGED = REGISTRY.replace(
    'tags = { team = "growth" }',
    'tags = { team = "growth" }\nsource = "warehouse.events"\ntransformation = "sessions.sql"\ncode_hash = "3f9a1c"\n'
    'freshness_sla = "1h"',
    1,
).replace(
    """name = "country"
type = "string"
default = "unknown"
""",
    """name = "country"
type = "string"
default = "unknown"
[[feature_groups.features]]
name = "sessions_7d"
type = "int64"
description = "sessions over the last seven days"
""",
    1,
)


@pytest.fixture(scope="module")
def ui_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, dict[str, str]]]:
    d = tmp_path_factory.mktemp("ui")
    tokens_file = d / "tokens.toml"
    tokens = {}
    for name, scopes, more in (
        ("operator", ["registry", "read", "write", "admin"], []),
        ("reader", ["read"], []),
        ("user_team", ["read"], ["--group", "user_"]),  # sees user_stats only
        ("slow", ["read"], ["--requests-per-second", "3"]),
    ):
        args = ["auth", "create", "--file", str(tokens_file), "--name", name, *more]
        for s in scopes:
            args += ["--scope", s]
        tokens[name] = cli(*args).stdout.strip()
    daemon = start_quiverd(
        d / "data",
        "--auth",
        "tokens",
        "--auth-tokens",
        str(tokens_file),
        "--ui-listen",
        "127.0.0.1:0",
        "--log-sample-rate",
        "1",
        # The history samples every 200 ms (test switch) rather than every 10 s.
        env={"QUIVER_TEST_UI_SAMPLE_MS": str(SAMPLE_MS)},
    )
    assert daemon.ui is not None and daemon.ui.startswith("http://127.0.0.1:")
    registry = d / "registry.toml"
    staged = d / "staged.toml"
    registry.write_text(REGISTRY)
    staged.write_text(STAGED)
    with quiver.Client(daemon.address, token=tokens["operator"], use_flight=False) as q:
        q.apply(registry)
        q.apply(staged)  # v2, staged
        users = [f"u{i}" for i in range(40)]
        df = pd.DataFrame(
            {
                "user_id": users,
                "event_timestamp": [NOW - timedelta(minutes=1)] * len(users),
                "clicks": list(range(len(users))),
                "spend": [float(i % 7) for i in range(len(users))],
                "country": ["fr" if i % 3 else "de" for i in range(len(users))],
            }
        )
        q.write(df, "user_stats")
        # Lookups: 40 known users and 10 unknown ones (NOT_FOUND, or DEFAULTED with defaults).
        q.get_online_features(["user_stats:clicks", "user_stats:spend"], [{"user_id": u} for u in users + ["nobody"] * 10])
    # A baseline from a training file whose spend is centred elsewhere: the served spend drifts.
    train = d / "train.csv"
    train.write_text(
        "user_id,event_timestamp,clicks,spend,country\n" + "".join(f"t{i},1000,{i},{50 + i % 5},fr\n" for i in range(200))
    )
    capture = ["baseline", "capture", "--addr", f"http://{daemon.address}", "--token", tokens["operator"], "--from", str(train)]
    out = cli(*capture, "--name", "train1", "--group", "user_stats", check=False)
    assert out.returncode == 0, out.stderr
    yield daemon, tokens
    daemon.stop()


def get(url: str, token: str | None = None, host: str | None = None, method: str = "GET") -> tuple[int, Any]:
    req = urllib.request.Request(url, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if host:
        req.add_header("Host", host)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
            return r.status, json.loads(body) if r.headers.get_content_type() == "application/json" else body.decode()
    except urllib.error.HTTPError as e:
        body = e.read()
        return e.code, json.loads(body) if e.headers.get_content_type() == "application/json" else body.decode()


def test_the_api_answers_with_the_services_rules(ui_node: tuple[Daemon, dict[str, str]]) -> None:
    daemon, tokens = ui_node
    base = daemon.ui
    assert base is not None
    # Without a token: the node says only that tokens are needed; the data is refused.
    assert get(f"{base}/api/node") == (200, {"auth": "tokens", "signed_in": False})
    status, body = get(f"{base}/api/registry")
    assert (status, body["code"]) == (401, "UNAUTHENTICATED")
    status, body = get(f"{base}/api/registry", token="qvt_not_a_token")
    assert (status, body["code"]) == (401, "UNAUTHENTICATED")
    # A reader sees the registry and health, not replication (admin).
    status, node = get(f"{base}/api/node", token=tokens["reader"])
    assert status == 200 and node["token"] == "reader" and node["scopes"] == ["read"]
    status, reg = get(f"{base}/api/registry", token=tokens["reader"])
    assert status == 200
    assert {g["name"] for g in reg["groups"]} == {"user_stats", "all_types", "balances"}
    user_stats = next(g for g in reg["groups"] if g["name"] == "user_stats")
    assert user_stats["serving_version"] == 1
    assert [(v["version"], v["state"]) for v in user_stats["versions"]] == [(1, "serving"), (2, "staged")]
    assert user_stats["owner"] == "growth@example.com" and user_stats["tags"] == [["team", "growth"]]
    status, body = get(f"{base}/api/replication", token=tokens["reader"])
    assert (status, body["code"]) == (403, "PERMISSION_DENIED")
    status, body = get(f"{base}/api/replication", token=tokens["operator"])
    assert status == 200 and body["peers"] == []
    # Errors carry the API's codes.
    status, body = get(f"{base}/api/group?name=nope", token=tokens["reader"])
    assert (status, body["code"]) == (404, "NOT_FOUND")
    status, body = get(f"{base}/api/group", token=tokens["reader"])
    assert (status, body["code"]) == (400, "INVALID_ARGUMENT")
    assert get(f"{base}/api/nothing", token=tokens["reader"])[0] == 404
    # Only reads, only from a loopback Host (no DNS rebinding).
    assert get(f"{base}/api/node", method="POST")[0] == 405
    assert get(f"{base}/api/node", host="evil.example")[0] == 421
    # Health: the lookups' statuses and the writes, with a series to chart.
    status, health = get(f"{base}/api/health", token=tokens["reader"])
    assert status == 200
    g = next(g for g in health["groups"] if g["group"] == "user_stats")
    clicks = next(f for f in g["features"] if f["feature"] == "clicks")
    spend = next(f for f in g["features"] if f["feature"] == "spend")
    assert clicks["counts"][0] == 40
    assert sum(clicks["counts"]) == 50 and sum(spend["counts"]) == 50
    assert spend["counts"][1] == 10  # spend has no default: NOT_FOUND
    assert g["values_written"] == 120
    assert g["series"]["written"][-1] == 120 and len(g["series"]["t_ms"]) >= 1
    # Drift: the baseline's bins and the served values' counts over the same bins.
    status, drift = get(f"{base}/api/drift?group=user_stats", token=tokens["reader"])
    assert status == 200 and drift["baseline"]["name"] == "train1"
    base_spend = next(f for f in drift["baseline"]["features"] if f["feature"] == "spend")
    served_spend = next(f for f in drift["drift"]["served"]["features"] if f["feature"] == "spend")
    assert len(served_spend["counts"]) == len(base_spend["counts"]) == len(base_spend["buckets"])
    assert sum(served_spend["counts"]) == served_spend["values"] == 40
    assert served_spend["breached"] is True


def test_group_limits_and_rate_limits_hold_on_the_ui(ui_node: tuple[Daemon, dict[str, str]]) -> None:
    daemon, tokens = ui_node
    base = daemon.ui
    # A token limited to groups starting with "user_" sees user_stats alone, everywhere.
    team = tokens["user_team"]
    status, reg = get(f"{base}/api/registry", token=team)
    assert status == 200 and [g["name"] for g in reg["groups"]] == ["user_stats"]
    status, health = get(f"{base}/api/health", token=team)
    assert status == 200 and [g["group"] for g in health["groups"]] == ["user_stats"]
    for path in ("/api/group?name=balances", "/api/drift?group=balances"):
        status, body = get(f"{base}{path}", token=team)
        assert (status, body["code"]) == (403, "PERMISSION_DENIED"), path
    assert get(f"{base}/api/group?name=user_stats", token=team)[0] == 200
    # A token allowed 3 requests a second: one page's call is one request, however many
    # service calls it makes (the registry with 3 groups makes 5).
    slow = tokens["slow"]
    assert get(f"{base}/api/registry", token=slow)[0] == 200
    codes = [get(f"{base}/api/registry", token=slow) for _ in range(6)]
    refused = [body for status, body in codes if status == 429]
    assert refused and refused[0]["code"] == "RESOURCE_EXHAUSTED", codes


def test_the_history_samples_the_counters(ui_node: tuple[Daemon, dict[str, str]]) -> None:
    daemon, tokens = ui_node
    base = daemon.ui

    def series(group: str) -> dict[str, list[Any]]:
        status, health = get(f"{base}/api/health", token=tokens["reader"])
        assert status == 200
        return next(g["series"] for g in health["groups"] if g["group"] == group)

    # Periodic samples of the group as it is (the fixture may have taken less than one interval).
    WebDriverWait(None, WAIT_S, poll_frequency=0.1).until(lambda _: len(series("balances")["t_ms"]) >= 3)
    before = series("balances")
    assert set(before["written"]) == {0}
    with quiver.Client(daemon.address, token=tokens["operator"], use_flight=False) as q:
        rows = [{"bank": "b", "number": n, "event_timestamp": NOW, "balance": 1.0} for n in range(3)]
        assert q.write(rows, "balances").values_written == 3
    # Periodic samples (not only the live one at the request) see the write.
    WebDriverWait(None, WAIT_S, poll_frequency=0.1).until(lambda _: series("balances")["written"][-3:-1] == [3, 3])
    after = series("balances")
    assert len(after["t_ms"]) > len(before["t_ms"]) >= 2
    assert after["t_ms"] == sorted(after["t_ms"])
    # The samples before the write stay: 0, then 3.
    assert after["written"][0] == 0 and after["written"][-1] == 3
    assert after["written"] == sorted(after["written"])


def chrome() -> WebDriver:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.fail("chromium and chromedriver are needed (apt-get install chromium chromium-driver; .ci/run does it)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1440,1000"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts)


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    # Keep chromedriver's own logs and Selenium Manager out of the way.
    os.environ.setdefault("SE_AVOID_STATS", "true")
    d = chrome()
    yield d
    d.quit()


def console_errors(d: WebDriver) -> list[str]:
    return [e["message"] for e in d.get_log("browser") if e["level"] == "SEVERE"]


def wait_page(d: WebDriver, name: str) -> None:
    WebDriverWait(d, WAIT_S).until(ec.presence_of_element_located((By.CSS_SELECTOR, f'main[data-page="{name}"]')))


def shot(d: WebDriver, name: str) -> None:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    # The whole page: the window as tall as the document.
    height = d.execute_script("return Math.max(document.body.scrollHeight, 600)")
    d.set_window_size(1440, min(int(height) + 40, 4000))
    assert d.save_screenshot(str(OUTPUT / f"{name}.png"))
    d.set_window_size(1440, 1000)


def text(d: WebDriver, css: str) -> str:
    return d.find_element(By.CSS_SELECTOR, css).text


def test_every_page_in_a_headless_browser(ui_node: tuple[Daemon, dict[str, str]], browser: WebDriver) -> None:
    daemon, tokens = ui_node
    d = browser
    d.get(f"{daemon.ui}/")
    wait_page(d, "login")
    shot(d, "login")
    assert console_errors(d) == []

    # A wrong token is refused on the form (the browser logs the 401: drained here).
    d.find_element(By.ID, "token").send_keys("qvt_wrong")
    d.find_element(By.CSS_SELECTOR, "#login button").click()
    WebDriverWait(d, WAIT_S).until(ec.presence_of_element_located((By.CSS_SELECTOR, "#login .error")))
    assert "unknown or revoked token" in text(d, "#login .error")
    assert all("401" in m for m in console_errors(d))

    # A reader: no replication page in the menu.
    d.find_element(By.ID, "token").send_keys(tokens["reader"])
    d.find_element(By.CSS_SELECTOR, "#login button").click()
    wait_page(d, "overview")
    assert not d.find_element(By.ID, "nav-replication").is_displayed()
    assert "token reader" in text(d, "#who")
    d.find_element(By.XPATH, "//button[text()='Sign out']").click()
    wait_page(d, "login")

    # The operator sees everything. Updates are paused, so that pages hold still while read.
    d.find_element(By.ID, "token").send_keys(tokens["operator"])
    d.find_element(By.CSS_SELECTOR, "#login button").click()
    wait_page(d, "overview")
    d.find_element(By.ID, "live").click()
    WebDriverWait(d, WAIT_S).until(lambda d: text(d, "#live") == "Resume updates")
    wait_page(d, "overview")
    groups = text(d, "#groups")
    for name in ("user_stats", "all_types", "balances"):
        assert name in groups
    assert text(d, "#card-entity-types").endswith("2")
    assert text(d, "#card-groups").endswith("3")
    shot(d, "overview")

    d.get(f"{daemon.ui}/#/registry")
    wait_page(d, "registry")
    types = text(d, "#entity-types")
    assert "user_id: string" in types and "number: int64" in types
    reg = text(d, "#feature-groups")
    assert "growth@example.com" in reg and "team=growth" in reg and "v2 staged" in reg
    shot(d, "registry")

    d.get(f"{daemon.ui}/#/group/user_stats")
    wait_page(d, "group")
    features = text(d, "#features")
    assert "clicks" in features and "int64" in features and '"unknown"' in features
    assert "sessions_7d" not in features  # the serving version
    props = text(d, "dl.props")
    assert "Owner\ngrowth@example.com" in props and "team=growth" in props and "TTL\n2.0 h" in props
    assert "Code hash\n—" in props
    assert "HTMLElement" not in d.find_element(By.TAG_NAME, "main").text
    d.find_element(By.CSS_SELECTOR, '.tabs button[data-version="2"]').click()
    WebDriverWait(d, WAIT_S).until(lambda d: "sessions_7d" in text(d, "#features"))
    assert "sessions over the last seven days" in text(d, "#features")
    props = text(d, "dl.props")
    assert "Source (lineage)\nwarehouse.events" in props and "sessions.sql" in props and "Code hash\n3f9a1c" in props
    assert "Freshness SLA\n60.0 min" in props
    shot(d, "group")

    d.get(f"{daemon.ui}/#/health")
    wait_page(d, "health")
    section = d.find_element(By.CSS_SELECTOR, '.section[data-group="user_stats"]')
    assert len(section.find_elements(By.CSS_SELECTOR, ".chart svg")) == 3
    # The status bars: present and not_found segments for spend.
    assert section.find_elements(By.CSS_SELECTOR, 'svg[aria-label="served statuses"] rect')
    assert "120 values written" in section.text
    shot(d, "health")

    d.get(f"{daemon.ui}/#/replication")
    wait_page(d, "replication")
    assert "no peers" in text(d, "#no-peers")
    shot(d, "replication")

    d.get(f"{daemon.ui}/#/drift/user_stats")
    wait_page(d, "drift:user_stats")
    spend = d.find_element(By.CSS_SELECTOR, '.hist-row[data-feature="spend"]')
    assert "drifting" in spend.text
    # Baseline and served bars for every bucket.
    assert len(spend.find_elements(By.CSS_SELECTOR, "svg rect")) >= 2 * 2
    shot(d, "drift")

    assert console_errors(d) == []


def test_the_ui_is_off_unless_asked_and_refuses_other_addresses(tmp_path: Path) -> None:
    daemon = start_quiverd(tmp_path / "a")
    try:
        assert daemon.ui is None
    finally:
        daemon.stop()
    out = subprocess.run(
        [
            str(binary("QUIVERD", "quiverd")),
            "--data-dir",
            str(tmp_path / "b"),
            "--listen",
            "127.0.0.1:0",
            "--ui-listen",
            "0.0.0.0:0",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0 and "loopback" in out.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_the_replication_page_shows_each_peer(tmp_path: Path, browser: WebDriver) -> None:
    """Two regions replicating on loopback (no tokens): region 1's page shows region 2 streaming
    and learns of its writes."""
    pa, pb = free_port(), free_port()
    a = start_quiverd(
        tmp_path / "a", "--region", "1", "--peer", f"2=127.0.0.1:{pb}", "--ui-listen", "127.0.0.1:0", listen=f"127.0.0.1:{pa}"
    )
    b = start_quiverd(tmp_path / "b", "--region", "2", "--peer", f"1=127.0.0.1:{pa}", listen=f"127.0.0.1:{pb}")
    try:
        assert a.ui is not None
        registry = tmp_path / "registry.toml"
        registry.write_text(REGISTRY)
        with quiver.Client(b.address, use_flight=False) as q:
            q.apply(registry)
            q.write([{"user_id": "r1", "event_timestamp": NOW, "clicks": 1}], "user_stats")

        def region_2_known(_: object) -> bool:
            status, r = get(f"{a.ui}/api/replication")
            peer = r["peers"][0] if status == 200 and r["peers"] else {}
            known = {k["region"]: k["counter"] for k in r.get("knowledge", [])}
            return peer.get("state") == "PEER_STATE_STREAMING" and peer.get("caught_up") and known.get(2, 0) > 0

        WebDriverWait(browser, WAIT_S, poll_frequency=0.2).until(region_2_known)
        browser.get(f"{a.ui}/#/replication")
        wait_page(browser, "replication")
        peers = text(browser, "#peers")
        assert f"127.0.0.1:{pb}" in peers and "streaming" in peers
        assert browser.find_elements(By.ID, "no-peers") == []
        assert "no authentication" in text(browser, "#who")
        shot(browser, "replication-peers")
        assert console_errors(browser) == []
    finally:
        a.stop()
        b.stop()
