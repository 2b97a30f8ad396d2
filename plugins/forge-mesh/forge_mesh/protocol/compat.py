"""The mesh protocol's shape as plain data, and what counts as a breaking change between two shapes.

``describe()`` turns the compiled descriptor of mesh.proto into JSON-able data; one such
document per released protocol version is stored in ``descriptors/`` and the suite checks the
current protocol against each (tests/test_mesh_protocol.py), like ``buf breaking`` would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2

STORED = Path(__file__).parent / "descriptors"
_LABELS = {1: "optional", 2: "required", 3: "repeated"}


def describe(file_descriptor: Any = None) -> dict[str, Any]:
    """Messages (fields by name: number, type, label, oneof) and the service's methods."""
    if file_descriptor is None:
        from . import mesh_pb2

        file_descriptor = mesh_pb2.DESCRIPTOR
    proto = descriptor_pb2.FileDescriptorProto()
    file_descriptor.CopyToProto(proto)
    messages = {}
    for m in proto.message_type:
        oneofs = [o.name for o in m.oneof_decl]
        fields = {}
        for f in m.field:
            entry = {"number": f.number, "type": descriptor_pb2.FieldDescriptorProto.Type.Name(f.type),
                     "label": _LABELS[f.label]}
            if f.type_name:
                entry["type_name"] = f.type_name
            if f.HasField("oneof_index") and not f.proto3_optional:
                entry["oneof"] = oneofs[f.oneof_index]
            fields[f.name] = entry
        messages[m.name] = {"fields": fields, "reserved": sorted(r.start for r in m.reserved_range)}
    services = {s.name: {meth.name: {"input": meth.input_type, "output": meth.output_type,
                                     "server_streaming": meth.server_streaming, "client_streaming": meth.client_streaming}
                         for meth in s.method} for s in proto.service}
    return {"package": proto.package, "messages": messages, "services": services}


def stored(version: int) -> dict[str, Any]:
    return json.loads((STORED / f"v{version}.json").read_text())


def breaking_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What in ``new`` breaks peers that speak ``old``: removed or changed messages, fields and methods,
    field numbers reused or renumbered. Adding messages, fields (new numbers) and methods is fine."""
    problems = []
    if old["package"] != new["package"]:
        problems.append(f"package renamed from {old['package']} to {new['package']}")
    for name, msg in old["messages"].items():
        if name not in new["messages"]:
            problems.append(f"message {name} removed")
            continue
        new_fields = new["messages"][name]["fields"]
        by_number = {f["number"]: fname for fname, f in new_fields.items()}
        for fname, f in msg["fields"].items():
            now = new_fields.get(fname)
            if now is None:
                if f["number"] not in new["messages"][name].get("reserved", []):
                    problems.append(f"{name}.{fname} (field {f['number']}) removed without reserving its number")
                continue
            for key in ("number", "type", "label", "type_name", "oneof"):
                if f.get(key) != now.get(key):
                    problems.append(f"{name}.{fname}: {key} changed from {f.get(key)!r} to {now.get(key)!r}")
        for fname, f in msg["fields"].items():
            taker = by_number.get(f["number"])
            if taker is not None and taker != fname:
                problems.append(f"{name}: field number {f['number']} of {fname} is now used by {taker}")
    for sname, methods in old["services"].items():
        now_methods = new["services"].get(sname)
        if now_methods is None:
            problems.append(f"service {sname} removed")
            continue
        for mname, m in methods.items():
            if mname not in now_methods:
                problems.append(f"method {sname}.{mname} removed")
            elif now_methods[mname] != m:
                problems.append(f"method {sname}.{mname} changed from {m} to {now_methods[mname]}")
    return problems
