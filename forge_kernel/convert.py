"""The one cattrs converter used at every edge: config, function arguments, job payloads.

It is strict: JSON ``"5"`` is not an ``int``, ``1`` is not a ``bool``, unknown keys are
rejected, and every failure becomes a list of ``Problem`` naming the exact path.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import decimal
import enum
import sys
import types
import typing
import uuid
from typing import Any, Mapping

import attrs
import cattrs
from cattrs.errors import (AttributeValidationNote, ClassValidationError, ForbiddenExtraKeysError,
                           IterableValidationError)


@attrs.frozen
class Problem:
    """One thing wrong with an input: where (``path`` like ``todo.tags[2]``) and what."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class InvalidValue(ValueError):
    """Raised by attrs validators: ``field`` got ``value`` but ``expected`` something else."""

    def __init__(self, field: str, value: Any, expected: str) -> None:
        super().__init__(f"{field}: expected {expected}, got {value!r}")
        self.field, self.value, self.expected = field, value, expected


class StructureError(ValueError):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(map(str, problems)))
        self.problems = problems


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or repr(tp).replace("typing.", "")


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _strict(tp: type, accept: tuple[type, ...], reject: tuple[type, ...] = ()):
    def hook(value: Any, _: Any) -> Any:
        if isinstance(value, accept) and not isinstance(value, reject):
            return tp(value)
        raise TypeError(f"expected {_type_name(tp)}, got {type(value).__name__} {_describe(value)}")

    return hook


def _parse(tp: type, parse, what: str):
    def hook(value: Any, _: Any) -> Any:
        if isinstance(value, tp):
            return value
        if not isinstance(value, str):
            raise TypeError(f"expected {what}, got {type(value).__name__} {_describe(value)}")
        try:
            return parse(value)
        except (ValueError, decimal.InvalidOperation):
            raise ValueError(f"expected {what}, got {_describe(value)}") from None

    return hook


def make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    conv.register_structure_hook(bool, _strict(bool, (bool,)))
    conv.register_structure_hook(int, _strict(int, (int,), (bool,)))
    conv.register_structure_hook(float, _strict(float, (int, float), (bool,)))
    conv.register_structure_hook(str, _strict(str, (str,)))
    conv.register_structure_hook(uuid.UUID, _parse(uuid.UUID, uuid.UUID, "a UUID string"))
    conv.register_structure_hook(dt.datetime, _parse(dt.datetime, dt.datetime.fromisoformat, "an ISO 8601 datetime"))
    conv.register_structure_hook(dt.date, _parse(dt.date, dt.date.fromisoformat, "an ISO 8601 date"))
    conv.register_structure_hook(decimal.Decimal, _parse(decimal.Decimal, decimal.Decimal, "a decimal string"))
    conv.register_structure_hook(
        dt.timedelta,
        lambda v, _: v if isinstance(v, dt.timedelta) else dt.timedelta(seconds=_strict(float, (int, float), (bool,))(v, None)),
    )
    # strings and dicts are iterable, but a str is never a list of str
    from cattrs._compat import is_mutable_set, is_sequence
    from cattrs.cols import homogenous_tuple_structure_factory, list_structure_factory

    def no_scalars(tp: Any, c: cattrs.Converter):
        origin = typing.get_origin(tp) or tp
        if is_mutable_set(tp):
            base = c._structure_set
        elif origin is tuple:
            args = typing.get_args(tp)
            base = homogenous_tuple_structure_factory(tp, c) if len(args) == 2 and args[1] is Ellipsis else c._structure_tuple
        else:
            base = list_structure_factory(tp, c)

        def hook(value: Any, t: Any) -> Any:
            if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__iter__"):
                raise TypeError(f"expected a list, got {type(value).__name__} {_describe(value)}")
            return base(value, t)

        return hook

    conv.register_structure_hook_factory(lambda t: is_sequence(t) or is_mutable_set(t), no_scalars)
    # bytes travel as base64 text (JSON has no bytes)
    conv.register_structure_hook(bytes, _base64)
    conv.register_unstructure_hook(bytes, lambda b: base64.b64encode(b).decode("ascii"))
    conv.register_structure_hook_factory(is_struct, _struct_structure)
    conv.register_unstructure_hook_factory(is_struct, _struct_unstructure)
    conv.register_structure_hook_factory(is_tagged_struct_union, _tagged_union_structure)
    conv.register_unstructure_hook(uuid.UUID, str)
    conv.register_unstructure_hook(dt.datetime, dt.datetime.isoformat)
    conv.register_unstructure_hook(dt.date, dt.date.isoformat)
    conv.register_unstructure_hook(decimal.Decimal, str)
    conv.register_unstructure_hook(dt.timedelta, dt.timedelta.total_seconds)
    return conv


def _base64(value: Any, _: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise TypeError(f"expected base64 text, got {type(value).__name__} {_describe(value)}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"expected base64 text, got {_describe(value)}") from None


# --- msgspec Structs: the same strict rules as attrs classes, through this converter's hooks ------
def is_struct(tp: Any) -> bool:
    """A msgspec Struct class (msgspec is imported by whoever defines one; the kernel does not need it)."""
    msgspec = sys.modules.get("msgspec")
    return msgspec is not None and isinstance(tp, type) and issubclass(tp, msgspec.Struct)


def struct_fields(tp: type) -> tuple[Any, ...]:
    """``msgspec.structs.fields``: name, encode_name (the wire key), type, default, default_factory."""
    return sys.modules["msgspec"].structs.fields(tp)


def struct_tag(tp: type) -> tuple[str, Any] | None:
    """(tag field, tag value) of a tagged Struct, e.g. ``("type", "Circle")``."""
    cfg = tp.__struct_config__
    return (cfg.tag_field, cfg.tag) if cfg.tag_field is not None else None


def struct_required(field: Any) -> bool:
    nodefault = sys.modules["msgspec"].NODEFAULT
    return field.default is nodefault and field.default_factory is nodefault


def _noted(exc: BaseException, name: str, tp: Any, cls: type) -> BaseException:
    exc.__notes__ = [*getattr(exc, "__notes__", []),
                     AttributeValidationNote(f"Structuring class {cls.__qualname__} @ attribute {name}", name, tp)]
    return exc


def _struct_structure(tp: type, conv: cattrs.Converter):
    fields = struct_fields(tp)
    tag = struct_tag(tp)
    known = {f.encode_name for f in fields} | ({tag[0]} if tag else set())

    def hook(value: Any, _: Any) -> Any:
        if not isinstance(value, Mapping):
            raise TypeError(f"expected an object, got {type(value).__name__} {_describe(value)}")
        errors: list[BaseException] = []
        extra = set(value) - known
        if extra:
            errors.append(ForbiddenExtraKeysError("", tp, extra))
        if tag and tag[0] in value and value[tag[0]] != tag[1]:
            errors.append(_noted(ValueError(f"expected {tag[1]!r}, got {_describe(value[tag[0]])}"), tag[0], str, tp))
        kwargs = {}
        for f in fields:
            if f.encode_name in value:
                try:
                    kwargs[f.name] = conv.structure(value[f.encode_name], f.type)
                except Exception as exc:  # noqa: BLE001 - collected like cattrs does for attrs classes
                    errors.append(_noted(exc, f.encode_name, f.type, tp))
            elif struct_required(f):
                errors.append(_noted(KeyError(f.encode_name), f.encode_name, f.type, tp))
        if errors:
            raise ClassValidationError(f"While structuring {tp.__name__}", errors, tp)
        return tp(**kwargs)

    return hook


def _struct_unstructure(tp: type, conv: cattrs.Converter):
    fields = [(f.name, f.encode_name, conv.get_unstructure_hook(f.type)) for f in struct_fields(tp)]
    tag = struct_tag(tp)

    def hook(obj: Any) -> dict[str, Any]:
        out: dict[str, Any] = {tag[0]: tag[1]} if tag else {}
        for name, key, unstructure_field in fields:
            out[key] = unstructure_field(getattr(obj, name))
        return out

    return hook


def is_tagged_struct_union(tp: Any) -> bool:
    """``A | B | ...`` (optionally ``| None``) of tagged Structs sharing one tag field."""
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return False
    members = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(members) < 2 or not all(is_struct(m) and struct_tag(m) for m in members):
        return False
    return len({struct_tag(m)[0] for m in members}) == 1


def _tagged_union_structure(tp: Any, conv: cattrs.Converter):
    members = [a for a in typing.get_args(tp) if a is not type(None)]
    optional = len(members) != len(typing.get_args(tp))
    field = struct_tag(members[0])[0]
    by_tag = {struct_tag(m)[1]: m for m in members}

    def hook(value: Any, _: Any) -> Any:
        if value is None and optional:
            return None
        if not isinstance(value, Mapping) or value.get(field) not in by_tag:
            got = value.get(field) if isinstance(value, Mapping) else value
            raise ValueError(f"expected an object whose {field!r} is one of {sorted(map(str, by_tag))}, "
                             f"got {_describe(got)}")
        return conv.structure(value, by_tag[value[field]])

    return hook


converter = make_converter()


def problems_of(exc: BaseException, path: str = "") -> list[Problem]:
    """Flatten a cattrs error tree into problems with dotted paths."""
    out: list[Problem] = []
    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            if isinstance(exc, IterableValidationError):
                p = f"{path}[{note.index!r}]"
            else:
                name = getattr(note, "name", None)
                p = f"{path}.{name}" if path else str(name)
            out.extend(problems_of(sub, p) if isinstance(sub, (ClassValidationError, IterableValidationError)) else [_leaf(sub, p)])
        for sub in without:
            out.extend(problems_of(sub, path))
    elif isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            out.extend(problems_of(sub, path))
    elif isinstance(exc, ForbiddenExtraKeysError):
        for key in sorted(exc.extra_fields):
            out.append(Problem(f"{path}.{key}" if path else key, "unknown key"))
    else:
        out.append(_leaf(exc, path))
    return out


def _leaf(exc: BaseException, path: str) -> Problem:
    if isinstance(exc, InvalidValue):
        return Problem(f"{path}.{exc.field}" if path else exc.field, f"expected {exc.expected}, got {exc.value!r}")
    if isinstance(exc, KeyError):
        return Problem(path, "required, missing")
    if isinstance(exc, AttributeError) and "items" in str(exc):
        return Problem(path, "expected an object")
    if isinstance(exc, TypeError) and "not iterable" in str(exc):
        return Problem(path, "expected a list")
    return Problem(path, str(exc) or type(exc).__name__)


def structure(value: Any, tp: Any) -> Any:
    """Structure ``value`` as ``tp`` or raise ``StructureError`` listing every problem."""
    try:
        return converter.structure(value, tp)
    except Exception as exc:  # cattrs raises many kinds; all become problems
        raise StructureError(problems_of(exc)) from None


#: what JSON holds as it is: the converter would return these unchanged, after a dispatch
_JSON_SCALARS = frozenset({int, str, float, bool, type(None)})


def unstructure(value: Any) -> Any:
    if value.__class__ in _JSON_SCALARS:
        return value
    if isinstance(value, enum.Enum):
        return value.value
    return converter.unstructure(value)
