"""The installed gRPC stubs are generated from this checkout's proto/ (never hand-edited): this
fails when they are stale, e.g. a package built before a .proto changed."""

from __future__ import annotations

import importlib
import importlib.resources
from collections.abc import Iterable
from pathlib import Path

import grpc
from conftest import REPO
from google.protobuf import descriptor_pb2


def _without_json_names(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
    """protoc's descriptor sets carry json_name; the descriptors embedded in _pb2 modules not."""
    for m in messages:
        for f in m.field:
            f.ClearField("json_name")
        _without_json_names(m.nested_type)


def test_installed_stubs_match_the_protos(tmp_path: Path) -> None:
    from grpc_tools import protoc

    proto_root = REPO / "proto"
    files = sorted(str(p.relative_to(proto_root)) for p in (proto_root / "quiver" / "v1").glob("*.proto"))
    assert files, "no protos found"
    out = tmp_path / "set.pb"
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    assert protoc.main(["protoc", f"-I{proto_root}", f"-I{well_known}", f"--descriptor_set_out={out}", *files]) == 0
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    assert {f.name for f in fresh.file} == set(files)
    channel = grpc.insecure_channel("127.0.0.1:1")
    for want in fresh.file:
        _without_json_names(want.message_type)
        module = importlib.import_module(want.name.replace("/", ".").removesuffix(".proto") + "_pb2")
        got = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
        assert got == want, f"{want.name}: the installed stubs are stale; reinstall the package (pip install ./python)"
        grpc_module = importlib.import_module(module.__name__ + "_grpc")
        for service in want.service:
            stub = getattr(grpc_module, f"{service.name}Stub")(channel)
            for method in service.method:
                assert hasattr(stub, method.name), f"{service.name}.{method.name} missing from the stubs"
    channel.close()
