"""The one cattrs converter used at every edge: config, function arguments, job payloads.

It is strict: JSON ``"5"`` is not an ``int``, ``1`` is not a ``bool``, unknown keys are
rejected, and every failure becomes a list of ``Problem`` naming the exact path.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import typing
import uuid
from typing import Any, Mapping

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError


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
    conv.register_unstructure_hook(uuid.UUID, str)
    conv.register_unstructure_hook(dt.datetime, dt.datetime.isoformat)
    conv.register_unstructure_hook(dt.date, dt.date.isoformat)
    conv.register_unstructure_hook(decimal.Decimal, str)
    conv.register_unstructure_hook(dt.timedelta, dt.timedelta.total_seconds)
    return conv


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


def unstructure(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    return converter.unstructure(value)
