"""The registry through the SDK: apply (files and objects), reads, versions, and the same file
giving the same request from the CLI and the SDK."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from conftest import Daemon, cli

import quiver


def test_reads_return_what_was_applied(client: quiver.Client) -> None:
    groups = {g.name: g for g in client.list_feature_groups()}
    assert {"user_stats", "all_types", "balances"} <= set(groups)
    g = client.get_feature_group("user_stats")
    assert g.version == 1 and g.entity_type == "user" and g.owner == "growth@example.com"
    assert g.ttl == timedelta(hours=2) and g.tags == {"team": "growth"}
    assert [(f.name, f.type, f.default) for f in g.features] == [
        ("clicks", "int64", 0),
        ("spend", "float64", None),
        ("country", "string", "unknown"),
    ]
    assert g.created_at is not None
    emb = client.get_feature_group("all_types").feature("emb")
    assert (emb.type, emb.dim) == ("float32_vector", 3)
    account = client.get_entity_type("account")
    assert [(k.name, k.type) for k in account.join_keys] == [("bank", "string"), ("number", "int64")]
    assert {"user", "account"} <= {e.name for e in client.list_entity_types()}
    with pytest.raises(quiver.QuiverNotFound):
        client.get_feature_group("no_such_group")


def test_objects_dry_run_staged_versions_promote_and_rollback(client: quiver.Client, uid: str) -> None:
    name = f"g_{uid}"
    group = quiver.FeatureGroup(
        name=name,
        entity_type="user",
        ttl=timedelta(minutes=30),
        features=[quiver.Feature("score", "float64", default=0.5)],
        code_hash="v1",
    )
    dry = client.apply([group], dry_run=True)
    assert [(c.kind, c.object) for c in dry] == [("created", f"feature_group:{name}")]
    with pytest.raises(quiver.QuiverNotFound):
        client.get_feature_group(name)
    created = client.apply([group])
    assert created[0].kind == "created" and created[0].serving and created[0].version == 1
    assert client.apply([group])[0].kind == "unchanged"

    group.code_hash = "v2"
    staged = client.apply([group])
    assert (staged[0].kind, staged[0].version, staged[0].serving) == ("new_version", 2, False)
    assert client.get_feature_group(name).version == 1
    states = {v.version: v.state for v in client.list_group_versions(name)}
    assert states == {1: "serving", 2: "staged"}
    assert client.promote(name, 2, force=True, reason="test") is True
    assert client.get_feature_group(name).version == 2
    assert client.rollback(name) == 1
    assert client.get_feature_group(name).version == 1


def test_registry_file_errors_are_invalid_argument(tmp_path: Path, client: quiver.Client) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[feature_groups]]\nname = "x"\nentity_type = "user"\nttl = "1w"\nfeatures = []\n')
    with pytest.raises(quiver.QuiverInvalidArgument, match="bad duration '1w'"):
        client.apply(bad)
    bad.write_text(
        '[[feature_groups]]\nname = "x"\nentity_type = "user"\nfeatures = [{ name = "a", type = "int64", default = "zero" }]\n'
    )
    with pytest.raises(quiver.QuiverInvalidArgument, match="default 'zero' is not a int64"):
        client.apply(bad)
    bad.write_text('[[feature_groups]]\nname = "x"\nentity_type = "user"\nowners = "a"\nfeatures = []\n')
    with pytest.raises(quiver.QuiverInvalidArgument, match="unknown field 'owners'"):
        client.apply(bad)
    # The server's own checks come back typed as well.
    bad.write_text('[[feature_groups]]\nname = "Bad-Name"\nentity_type = "user"\nfeatures = [{ name = "a", type = "int64" }]\n')
    with pytest.raises(quiver.QuiverInvalidArgument):
        client.apply(bad)


FULL = """
[[entity_types]]
name = "{uid}_shop"
description = "a shop"
join_keys = [{{ name = "shop_id", type = "int64" }}]

[[feature_groups]]
name = "{uid}_shop_stats"
entity_type = "{uid}_shop"
owner = "ops@example.com"
description = "every field the file format has"
ttl = "3d"
freshness_sla = "90m"
log_sample_rate = 0.25
min_coverage_ratio = 0.9
max_shadow_mismatch_rate = 0.02
source = "warehouse.shops"
transformation = "daily_rollup"
code_hash = "abc123"
tags = {{ team = "ops", tier = "batch" }}
[[feature_groups.features]]
name = "revenue"
type = "float32"
default = 3
description = "daily revenue"
max_null_rate = 0.1
max_psi = 0.3
max_ks = 0.2
[[feature_groups.features]]
name = "embedding"
type = "float32_vector"
dim = 2
default = [1, 2.5]
[[feature_groups.features]]
name = "codes"
type = "int64_list"
default = [1, -2]
[[feature_groups.features]]
name = "labels"
type = "string_list"
default = ["a", "b"]
[[feature_groups.features]]
name = "blob"
type = "bytes"
default = "raw"
[[feature_groups.features]]
name = "open"
type = "bool"
default = true
"""


def test_the_cli_and_the_sdk_read_a_registry_file_the_same_way(
    daemon: Daemon, client: quiver.Client, uid: str, tmp_path: Path
) -> None:
    path = tmp_path / "full.toml"
    path.write_text(FULL.format(uid=f"c{uid}"))
    # The CLI creates everything; the SDK's apply of the same file then changes nothing.
    cli("--addr", f"http://{daemon.address}", "apply", str(path))
    changes = client.apply(path, dry_run=True)
    assert [c.kind for c in changes] == ["unchanged", "unchanged"], changes
    # And the other way round, on fresh names.
    path.write_text(FULL.format(uid=f"s{uid}"))
    client.apply(path)
    out = cli("--addr", f"http://{daemon.address}", "apply", "--dry-run", str(path)).stdout
    assert out.count("unchanged") == 2 and "create " not in out, out
    g = client.get_feature_group(f"s{uid}_shop_stats")
    assert g.freshness_sla == timedelta(minutes=90) and g.log_sample_rate == 0.25
    assert [f.default for f in g.features] == [3.0, [1.0, 2.5], [1, -2], ["a", "b"], b"raw", True]


def test_the_readme_quickstart_runs(daemon: Daemon) -> None:
    import subprocess
    import sys

    quickstart = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"
    out = subprocess.run([sys.executable, str(quickstart), daemon.address], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "trips_today" in out.stdout and "PRESENT" in out.stdout
