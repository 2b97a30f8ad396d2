"""Python type hints to TypeScript types, as the kernel's wire converter shapes them.

What a function receives and returns crosses the wire through ``forge_kernel.convert.converter``
(cattrs): attrs classes and dataclasses by attribute name, every field written on the way out,
fields with defaults optional on the way in, ``UUID``/``datetime``/``date``/``Decimal`` as
strings, ``timedelta`` as seconds, ``bytes`` as base64, enums as their values, msgspec Structs
by their encode names (with their tag). This module mirrors that mapping and asks the converter
itself whether it can structure each argument type, so a type the wire cannot carry is an error
here too - never ``any``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import inspect
import json
import re
import types
import typing
import uuid
from collections import abc
from typing import Any

import attrs

from forge_kernel.convert import converter, is_struct, struct_fields, struct_required, struct_tag

_IDENT = re.compile(r"^[A-Za-z_$][A-Za-z0-9_$]*$")
_NONE = type(None)
#: (Python type, TypeScript type); order matters: datetime is a date
_SCALARS: list[tuple[type, str]] = [
    (bool, "boolean"), (int, "number"), (float, "number"), (str, "string"),
    (uuid.UUID, "UUID"), (dt.datetime, "DateTime"), (dt.date, "DateString"),
    (decimal.Decimal, "Decimal"), (dt.timedelta, "number"), (bytes, "Base64"),
]
_SEQUENCES = (list, set, frozenset, abc.Sequence, abc.MutableSequence, abc.Set, abc.MutableSet, abc.Collection,
              abc.Iterable)
_MAPPINGS = (dict, abc.Mapping, abc.MutableMapping)


class Unsupported(Exception):
    """A type the generator cannot express exactly; ``path`` says where inside the argument."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path, self.message = path, message


def _name(tp: Any) -> str:
    return getattr(tp, "__qualname__", None) or getattr(tp, "__name__", None) or repr(tp).replace("typing.", "")


def _key(name: str) -> str:
    return name if _IDENT.match(name) else json.dumps(name)


@attrs.define
class _Field:
    key: str  # the wire key
    tp: Any
    #: may be left out of the input (a default exists)
    optional_in: bool
    #: may be missing from the output (TypedDict keys that are not required)
    optional_out: bool = False
    #: part of the input at all (attrs ``init=False`` fields are output only)
    in_input: bool = True
    #: a fixed value (a msgspec tag)
    literal: Any = None
    has_literal: bool = False


class TypeScriptTypes:
    """Collects named declarations (interfaces, aliases) while rendering types."""

    def __init__(self) -> None:
        #: TypeScript name -> declaration text, in the order first needed
        self.declarations: dict[str, str] = {}
        self._names: dict[tuple[Any, bool], str] = {}
        self._taken: set[str] = set()

    # --- public -------------------------------------------------------------------------------
    def render(self, tp: Any, *, output: bool, path: str = "") -> str:
        """The TypeScript type of ``tp`` travelling to the client (``output``) or from it."""
        text = self._ts(tp, output, path)  # first: its errors name the field
        if not output:
            self._check_structurable(tp, path)
        return text

    # --- helpers ------------------------------------------------------------------------------
    def _check_structurable(self, tp: Any, path: str) -> None:
        try:
            converter.get_structure_hook(tp)
        except Exception as exc:  # noqa: BLE001 - cattrs raises several kinds
            raise Unsupported(path, f"the wire converter cannot read {_name(tp)} ({exc})") from None

    def _claim(self, base: str) -> str:
        name, n = base, 2
        while name in self._taken:
            name, n = f"{base}{n}", n + 1
        self._taken.add(name)
        return name

    def _ts(self, tp: Any, output: bool, path: str) -> str:
        if tp is _NONE or tp is None:
            return "null"
        if tp is Any or tp is object or tp is inspect.Parameter.empty:
            raise Unsupported(path, f"{_name(tp)} says nothing about the value: give a concrete type")
        if isinstance(tp, typing.TypeVar):
            raise Unsupported(path, f"type variable {tp.__name__} is not supported")
        if isinstance(tp, typing.NewType):
            return self._ts(tp.__supertype__, output, path)
        if isinstance(tp, str) or isinstance(tp, typing.ForwardRef):
            raise Unsupported(path, f"unresolved forward reference {tp!r}")
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin in (typing.Annotated, typing.NotRequired, typing.Required):
            return self._ts(args[0], output, path)
        if origin is typing.Literal:
            return " | ".join(self._literal(a, path) for a in args)
        if origin in (typing.Union, types.UnionType):
            return self._union(tp, args, output, path)
        for py, ts in _SCALARS:
            if tp is py:
                return ts
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return self._enum(tp, path)
        if origin is tuple or tp is tuple:
            if not args:
                raise Unsupported(path, "a bare tuple: give the element types (tuple[int, ...] or tuple[int, str])")
            if len(args) == 2 and args[1] is Ellipsis:
                return self._array(self._ts(args[0], output, f"{path}[]"))
            if args == ((),):
                return "[]"
            return "[" + ", ".join(self._ts(a, output, f"{path}[{i}]") for i, a in enumerate(args)) + "]"
        if origin in _SEQUENCES or tp in _SEQUENCES:
            if not args:
                raise Unsupported(path, f"a bare {_name(tp)}: give the element type ({_name(tp)}[str])")
            return self._array(self._ts(args[0], output, f"{path}[]"))
        if origin in _MAPPINGS or tp in _MAPPINGS:
            if len(args) != 2:
                raise Unsupported(path, f"a bare {_name(tp)}: give key and value types (dict[str, int])")
            return self._mapping(args[0], args[1], output, path)
        if isinstance(tp, type) and (attrs.has(tp) or dataclasses.is_dataclass(tp) or is_struct(tp)
                                     or typing.is_typeddict(tp)):
            return self._object(tp, output, path)
        if origin is not None:
            raise Unsupported(path, f"{_name(tp)} is not supported (generic {_name(origin)})")
        raise Unsupported(path, f"{_name(tp)} has no wire representation FORGE knows")

    @staticmethod
    def _array(item: str) -> str:
        return f"({item})[]" if " " in item else f"{item}[]"

    def _literal(self, value: Any, path: str) -> str:
        if isinstance(value, enum.Enum):
            value = value.value
        if value is None or isinstance(value, (bool, int, str)) and not isinstance(value, float):
            return json.dumps(value)
        raise Unsupported(path, f"Literal value {value!r} is not a string, number, boolean or None")

    def _enum(self, tp: type, path: str) -> str:
        key = (tp, True)
        if key in self._names:
            return self._names[key]
        values = []
        for member in tp:
            if isinstance(member.value, bool) or not isinstance(member.value, (int, str)):
                raise Unsupported(path, f"enum {tp.__name__}: member {member.name} has the value {member.value!r}; "
                                        "only string and integer values travel as JSON")
            values.append(json.dumps(member.value))
        name = self._claim(tp.__name__)
        self._names[key] = self._names[(tp, False)] = name
        self.declarations[name] = f"export type {name} = {' | '.join(values) or 'never'};"
        return name

    def _union(self, tp: Any, args: tuple[Any, ...], output: bool, path: str) -> str:
        members = [a for a in args if a is not _NONE]
        nullable = len(members) != len(args)
        if len(members) > 1:
            # the converter reads unions of classes it can tell apart (unique required fields, a Literal
            # tag, msgspec tags) and Literal unions; anything else it refuses, and so do we
            if not all(isinstance(m, type) and (attrs.has(m) or dataclasses.is_dataclass(m) or is_struct(m))
                       for m in members):
                raise Unsupported(path, f"{' | '.join(_name(m) for m in members)}: the wire cannot tell these apart; "
                                        "use X | None, a Literal, or a union of classes with a Literal tag field")
            self._check_structurable(tp, path)
        parts = [self._ts(m, output, path) for m in members]
        if nullable:
            parts.append("null")
        return " | ".join(parts)

    def _mapping(self, key: Any, value: Any, output: bool, path: str) -> str:
        val = self._ts(value, output, f"{path}{{}}")
        if key is str or key is uuid.UUID:
            return f"Record<string, {val}>"
        if typing.get_origin(key) is typing.Literal or (isinstance(key, type) and issubclass(key, enum.Enum)):
            keys = self._ts(key, output, path)
            if all(isinstance(v.value if isinstance(v, enum.Enum) else v, str)
                   for v in (typing.get_args(key) if typing.get_origin(key) is typing.Literal else list(key))):
                return f"Partial<Record<{keys}, {val}>>"
        raise Unsupported(path, f"dict keys of type {_name(key)}: JSON object keys are strings "
                                "(use str, UUID, or a Literal/Enum of strings)")

    def _fields(self, tp: type) -> list[_Field]:
        hints = typing.get_type_hints(tp, include_extras=True)
        if attrs.has(tp):
            # the converter uses attribute names (use_alias is off) and writes every field
            use_alias = getattr(converter, "use_alias", False)
            return [_Field(a.alias if use_alias else a.name, hints.get(a.name, a.type),
                           optional_in=a.default is not attrs.NOTHING, in_input=a.init)
                    for a in attrs.fields(tp)]
        if dataclasses.is_dataclass(tp):
            return [_Field(f.name, hints.get(f.name, f.type),
                           optional_in=f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING,
                           in_input=f.init)
                    for f in dataclasses.fields(tp)]
        if is_struct(tp):
            out = []
            tag = struct_tag(tp)
            if tag:
                out.append(_Field(tag[0], type(tag[1]), optional_in=True, literal=tag[1], has_literal=True))
            out += [_Field(f.encode_name, f.type, optional_in=not struct_required(f)) for f in struct_fields(tp)]
            return out
        required = getattr(tp, "__required_keys__", frozenset(hints))
        return [_Field(k, v, optional_in=k not in required, optional_out=k not in required) for k, v in hints.items()]

    def _object(self, tp: type, output: bool, path: str) -> str:
        key = (tp, output)
        if key in self._names:
            return self._names[key]
        try:
            fields = self._fields(tp)
        except Exception as exc:  # noqa: BLE001 - unresolvable hints and the like
            raise Unsupported(path, f"cannot read the fields of {_name(tp)}: {type(exc).__name__}: {exc}") from None
        differs = any(f.optional_in != f.optional_out or not f.in_input for f in fields)
        other = self._names.get((tp, not output))
        if other is not None and not differs:
            self._names[key] = other
            return other
        name = self._claim(tp.__name__ if output or not differs else f"{tp.__name__}Input")
        self._names[key] = name
        if not differs:
            self._names[(tp, not output)] = name
        lines = []
        try:
            for f in fields:
                if not output and not f.in_input:
                    continue
                optional = f.optional_out if output else f.optional_in
                text = json.dumps(f.literal) if f.has_literal else self._ts(f.tp, output, f"{path}.{f.key}")
                lines.append(f"  {_key(f.key)}{'?' if optional else ''}: {text};")
        except Unsupported:
            # forget the half-made declaration: the other direction must find the problem again
            for k in [k for k, v in self._names.items() if v == name]:
                del self._names[k]
            self._taken.discard(name)
            raise
        body = "\n".join(lines)
        self.declarations[name] = f"export interface {name} {{\n{body}\n}}" if lines else f"export interface {name} {{}}"
        return name
