"""Registry objects (entity types, feature groups, features) and the registry file.

The TOML format is the one ``quiver apply`` reads (``tools/src/registry_file.rs``)::

    [[entity_types]]
    name = "user"
    join_keys = [{ name = "user_id", type = "string" }]

    [[feature_groups]]
    name = "user_stats"
    entity_type = "user"
    ttl = "1h"
    [[feature_groups.features]]
    name = "clicks"
    type = "int64"
    default = 0
    [[feature_groups.features]]     # an aggregate, computed from its source when read
    name = "clicks_7d"
    source = "clicks"
    agg = "sum"                     # count sum mean min max last_n count_distinct
    window = "7d"

Applying the same file with the CLI and with :meth:`quiver.Client.apply` gives the same
request; ``tests/test_registry.py`` checks it by applying a file with one and seeing the other
report every object unchanged.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from os import PathLike
from typing import Any

from quiver.v1 import registry_pb2 as reg
from quiver.v1 import types_pb2 as types

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "JoinKey",
    "EntityType",
    "Feature",
    "FeatureGroup",
    "RegistryChange",
    "GroupVersion",
    "load_registry",
    "VALUE_TYPES",
    "AGG_FUNCTIONS",
]

#: Value type names as the registry file spells them, and their protobuf enum values.
VALUE_TYPES: dict[str, types.ValueType] = {
    "bool": types.VALUE_TYPE_BOOL,
    "int64": types.VALUE_TYPE_INT64,
    "float32": types.VALUE_TYPE_FLOAT32,
    "float64": types.VALUE_TYPE_FLOAT64,
    "string": types.VALUE_TYPE_STRING,
    "bytes": types.VALUE_TYPE_BYTES,
    "float32_vector": types.VALUE_TYPE_FLOAT32_VECTOR,
    "int64_list": types.VALUE_TYPE_INT64_LIST,
    "string_list": types.VALUE_TYPE_STRING_LIST,
}
_TYPE_NAMES = {v: k for k, v in VALUE_TYPES.items()}
#: Aggregate function names as the registry file spells them, and their protobuf enum values.
AGG_FUNCTIONS: dict[str, reg.AggFunction] = {
    "count": reg.AGG_FUNCTION_COUNT,
    "sum": reg.AGG_FUNCTION_SUM,
    "mean": reg.AGG_FUNCTION_MEAN,
    "min": reg.AGG_FUNCTION_MIN,
    "max": reg.AGG_FUNCTION_MAX,
    "last_n": reg.AGG_FUNCTION_LAST_N,
    "count_distinct": reg.AGG_FUNCTION_COUNT_DISTINCT,
}
_AGG_NAMES = {v: k for k, v in AGG_FUNCTIONS.items()}
_JOIN_KEY_TYPES = {"string": reg.JOIN_KEY_TYPE_STRING, "int64": reg.JOIN_KEY_TYPE_INT64}
_JOIN_KEY_NAMES = {v: k for k, v in _JOIN_KEY_TYPES.items()}


def _bad(message: str) -> Exception:
    from quiver.errors import QuiverInvalidArgument

    return QuiverInvalidArgument(message)


@dataclass
class JoinKey:
    name: str
    #: "string" or "int64".
    type: str = "string"


@dataclass
class EntityType:
    """A kind of thing features describe, with its typed join keys in key order."""

    name: str
    join_keys: list[JoinKey]
    description: str = ""

    def to_proto(self) -> reg.EntityType:
        keys = []
        for k in self.join_keys:
            if k.type not in _JOIN_KEY_TYPES:
                raise _bad(f"entity type {self.name}: join key {k.name} has type {k.type!r} (string or int64)")
            keys.append(reg.JoinKey(name=k.name, type=_JOIN_KEY_TYPES[k.type]))
        return reg.EntityType(name=self.name, join_keys=keys, description=self.description)

    @classmethod
    def from_proto(cls, m: reg.EntityType) -> EntityType:
        return cls(
            name=m.name,
            join_keys=[JoinKey(k.name, _JOIN_KEY_NAMES.get(k.type, "unspecified")) for k in m.join_keys],
            description=m.description,
        )


@dataclass
class Feature:
    """A feature of a group: written (``type`` given), or an aggregate of a written feature of
    the same group (``source``, ``agg``, ``window``; README "Windowed aggregations"), whose
    type the server sets from the function and the source."""

    name: str
    #: One of :data:`VALUE_TYPES`' keys ("" for an aggregate: the server sets it).
    type: str = ""
    #: Served with status DEFAULTED when nothing is within the TTL (must match ``type``).
    default: Any = None
    description: str = ""
    max_null_rate: float | None = None
    max_psi: float | None = None
    max_ks: float | None = None
    #: float32_vector only: the length of every vector (0: any).
    dim: int = 0
    #: Aggregates: the written feature aggregated, one of :data:`AGG_FUNCTIONS`' keys, the
    #: window (whole seconds, 1 s to 366 days) and, for "last_n", how many values (1 to 1000).
    source: str = ""
    agg: str = ""
    window: timedelta | None = None
    n: int = 0

    def _aggregation(self, what: str) -> reg.Aggregation | None:
        if not (self.source or self.agg or self.window is not None or self.n):
            return None
        if not (self.source and self.agg and self.window is not None):
            raise _bad(f"{what}: an aggregate needs source, agg and window (and n for last_n)")
        if self.agg not in AGG_FUNCTIONS:
            raise _bad(f"{what}: unknown agg {self.agg!r} ({', '.join(AGG_FUNCTIONS)})")
        a = reg.Aggregation(source=self.source, function=AGG_FUNCTIONS[self.agg], n=self.n)
        a.window.FromTimedelta(self.window)
        return a


@dataclass
class FeatureGroup:
    """A versioned set of features on one entity type. ``version`` and ``created_at`` are set
    by the registry (0 / None in a definition to apply)."""

    name: str
    entity_type: str
    features: list[Feature]
    owner: str = ""
    description: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    ttl: timedelta | None = None
    freshness_sla: timedelta | None = None
    log_sample_rate: float | None = None
    min_coverage_ratio: float | None = None
    max_shadow_mismatch_rate: float | None = None
    source: str = ""
    transformation: str = ""
    code_hash: str = ""
    version: int = 0
    created_at: datetime | None = None

    def feature(self, name: str) -> Feature:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(name)

    def to_proto(self) -> reg.FeatureGroup:
        features = []
        for f in self.features:
            what = f"feature {self.name}:{f.name}"
            aggregation = f._aggregation(what)
            if not f.type and aggregation is not None:
                t = types.VALUE_TYPE_UNSPECIFIED
                if f.default is not None:
                    raise _bad(f"{what}: give the aggregate's type to give it a default")
            elif f.type not in VALUE_TYPES:
                raise _bad(f"{what}: unknown type {f.type!r}" if f.type else f"{what}: needs a type")
            else:
                t = VALUE_TYPES[f.type]
            default = None if f.default is None else _default_value(f.default, f.type, what)
            features.append(
                reg.FeatureDef(
                    name=f.name,
                    type=t,
                    default_value=default,
                    description=f.description,
                    max_null_rate=f.max_null_rate,
                    max_psi=f.max_psi,
                    max_ks=f.max_ks,
                    dim=f.dim,
                    aggregation=aggregation,
                )
            )
        m = reg.FeatureGroup(
            name=self.name,
            version=self.version,
            entity_type=self.entity_type,
            owner=self.owner,
            description=self.description,
            tags=self.tags,
            source=self.source,
            transformation=self.transformation,
            code_hash=self.code_hash,
            features=features,
            log_sample_rate=self.log_sample_rate,
            min_coverage_ratio=self.min_coverage_ratio,
            max_shadow_mismatch_rate=self.max_shadow_mismatch_rate,
        )
        if self.ttl is not None:
            m.ttl.FromTimedelta(self.ttl)
        if self.freshness_sla is not None:
            m.freshness_sla.FromTimedelta(self.freshness_sla)
        return m

    @classmethod
    def from_proto(cls, m: reg.FeatureGroup) -> FeatureGroup:
        return cls(
            name=m.name,
            entity_type=m.entity_type,
            features=[
                Feature(
                    name=f.name,
                    type=_TYPE_NAMES.get(f.type, "unspecified"),
                    default=value_from_proto(f.default_value) if f.HasField("default_value") else None,
                    description=f.description,
                    max_null_rate=f.max_null_rate if f.HasField("max_null_rate") else None,
                    max_psi=f.max_psi if f.HasField("max_psi") else None,
                    max_ks=f.max_ks if f.HasField("max_ks") else None,
                    dim=f.dim,
                    source=f.aggregation.source,
                    agg=_AGG_NAMES.get(f.aggregation.function, ""),
                    window=f.aggregation.window.ToTimedelta() if f.HasField("aggregation") else None,
                    n=f.aggregation.n,
                )
                for f in m.features
            ],
            owner=m.owner,
            description=m.description,
            tags=dict(m.tags),
            ttl=m.ttl.ToTimedelta() if m.HasField("ttl") else None,
            freshness_sla=m.freshness_sla.ToTimedelta() if m.HasField("freshness_sla") else None,
            log_sample_rate=m.log_sample_rate if m.HasField("log_sample_rate") else None,
            min_coverage_ratio=m.min_coverage_ratio if m.HasField("min_coverage_ratio") else None,
            max_shadow_mismatch_rate=m.max_shadow_mismatch_rate if m.HasField("max_shadow_mismatch_rate") else None,
            source=m.source,
            transformation=m.transformation,
            code_hash=m.code_hash,
            version=m.version,
            created_at=m.created_at.ToDatetime(tzinfo=timezone.utc) if m.HasField("created_at") else None,
        )


@dataclass
class RegistryChange:
    """What an apply did (or, dry, would do) to one object."""

    #: "created", "new_version" or "unchanged".
    kind: str
    #: "entity_type:user" or "feature_group:user_stats".
    object: str
    version: int
    details: list[str]
    #: Whether ``version`` serves unpinned references after the apply (a new version of an
    #: existing group is staged unless the apply promoted it).
    serving: bool

    @classmethod
    def from_proto(cls, m: reg.RegistryChange) -> RegistryChange:
        kinds = {1: "created", 2: "new_version", 3: "unchanged"}
        return cls(kinds.get(m.kind, "unspecified"), m.object, m.version, list(m.details), m.serving)


@dataclass
class GroupVersion:
    """One version of a group as ``list_group_versions`` reports it."""

    version: int
    #: "serving", "staged", "inactive" or "retired".
    state: str
    created_at: datetime | None
    #: What changed against the previous version, one line each.
    details: list[str]

    @classmethod
    def from_proto(cls, m: reg.GroupVersion) -> GroupVersion:
        states = {1: "serving", 2: "staged", 3: "inactive", 4: "retired"}
        created = m.created_at.ToDatetime(tzinfo=timezone.utc) if m.HasField("created_at") else None
        return cls(m.version, states.get(m.state, "unspecified"), created, list(m.details))


def _duration(s: str, what: str) -> timedelta:
    """ "90s", "15m", "1h", "7d", as the CLI parses them."""
    digits = len(s) - len(s.lstrip("0123456789"))
    num, unit = s[:digits], s[digits:]
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if not num or unit not in units:
        raise _bad(f"{what}: bad duration {s!r} (use e.g. 90s, 15m, 1h, 7d)")
    return timedelta(seconds=int(num) * units[unit])


def _default_value(v: Any, type_name: str, what: str) -> types.Value:
    def bad() -> Exception:
        return _bad(f"{what}: default {v!r} is not a {type_name}")

    if type_name == "bool":
        if not isinstance(v, bool):
            raise bad()
        return types.Value(bool_value=v)
    if type_name == "int64":
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad()
        return types.Value(int64_value=v)
    if type_name in ("float32", "float64"):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad()
        if type_name == "float32":
            return types.Value(float32_value=float(v))
        return types.Value(float64_value=float(v))
    if type_name == "string":
        if not isinstance(v, str):
            raise bad()
        return types.Value(string_value=v)
    if type_name == "bytes":
        if isinstance(v, str):
            return types.Value(bytes_value=v.encode())
        if not isinstance(v, (bytes, bytearray)):
            raise bad()
        return types.Value(bytes_value=bytes(v))
    if not isinstance(v, (list, tuple)):
        raise bad()
    if type_name == "float32_vector":
        if any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in v):
            raise bad()
        return types.Value(float32_vector=types.Float32List(values=[float(x) for x in v]))
    if type_name == "int64_list":
        if any(isinstance(x, bool) or not isinstance(x, int) for x in v):
            raise bad()
        return types.Value(int64_list=types.Int64List(values=list(v)))
    if type_name == "string_list":
        if any(not isinstance(x, str) for x in v):
            raise bad()
        return types.Value(string_list=types.StringList(values=list(v)))
    raise bad()


def value_from_proto(v: types.Value) -> Any:
    """A ``quiver.v1.Value`` as a Python value (lists for vectors and lists)."""
    kind = v.WhichOneof("kind")
    if kind is None:
        return None
    x = getattr(v, kind)
    if kind in ("float32_vector", "int64_list", "string_list"):
        return list(x.values)
    return x


_GROUP_KEYS = {
    "name",
    "entity_type",
    "owner",
    "description",
    "tags",
    "ttl",
    "freshness_sla",
    "log_sample_rate",
    "min_coverage_ratio",
    "max_shadow_mismatch_rate",
    "source",
    "transformation",
    "code_hash",
    "features",
}
_FEATURE_KEYS = {
    "name",
    "type",
    "default",
    "description",
    "max_null_rate",
    "max_psi",
    "max_ks",
    "dim",
    "source",
    "agg",
    "window",
    "n",
}


def _check_keys(table: dict[str, Any], allowed: set[str], required: set[str], what: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise _bad(f"{what}: unknown field {unknown[0]!r}")
    missing = sorted(required - set(table))
    if missing:
        raise _bad(f"{what}: missing field {missing[0]!r}")


def parse_registry(text: str) -> tuple[list[EntityType], list[FeatureGroup]]:
    """Parses registry TOML (the ``quiver apply`` format)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _bad(f"registry file: {e}") from None
    _check_keys(doc, {"entity_types", "feature_groups"}, set(), "registry file")
    entity_types = []
    for ent in doc.get("entity_types", []):
        _check_keys(ent, {"name", "description", "join_keys"}, {"name", "join_keys"}, "entity type")
        keys = []
        for k in ent["join_keys"]:
            _check_keys(k, {"name", "type"}, {"name", "type"}, f"entity type {ent['name']}: join key")
            keys.append(JoinKey(k["name"], k["type"]))
        et = EntityType(ent["name"], keys, ent.get("description", ""))
        et.to_proto()  # checks the join key types now, with the file's names in the message
        entity_types.append(et)
    groups = []
    for g in doc.get("feature_groups", []):
        what = f"feature group {g.get('name', '?')}"
        _check_keys(g, _GROUP_KEYS, {"name", "entity_type", "features"}, what)
        features = []
        for f in g["features"]:
            _check_keys(f, _FEATURE_KEYS, {"name"} if "agg" in f else {"name", "type"}, f"{what}: feature")
            window = f.get("window")
            fields = {k: v for k, v in f.items() if k != "window"}
            if window is not None:
                fields["window"] = _duration(window, f"{what}: feature {f['name']}: window")
            features.append(Feature(**fields))
        group = FeatureGroup(
            **{k: v for k, v in g.items() if k not in ("features", "ttl", "freshness_sla")},
            features=features,
            ttl=_duration(g["ttl"], f"{what}: ttl") if "ttl" in g else None,
            freshness_sla=_duration(g["freshness_sla"], f"{what}: freshness_sla") if "freshness_sla" in g else None,
        )
        group.to_proto()  # checks types and defaults now
        groups.append(group)
    return entity_types, groups


def load_registry(path: str | PathLike[str]) -> tuple[list[EntityType], list[FeatureGroup]]:
    """Reads a registry file (the ``quiver apply`` TOML format)."""
    with open(path, encoding="utf-8") as f:
        return parse_registry(f.read())
