"""Reading suites: safe YAML, located validation errors and one-line messages.

Validators report problems with :func:`fail` (every problem at once, each at a
field path) or :func:`custom_error`; :func:`validate` turns pydantic's errors
into ``SOURCE: field.path: message`` lines such as
``suites/x.yaml: tasks[1].model.activation: 'tahn' is not one of tanh, relu, ...``.
"""

from __future__ import annotations

import functools
import re
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import pydantic
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    Tag,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from hessbench.errors import ConfigError

__all__ = [
    "KwValue",
    "Name",
    "Number",
    "ParamValue",
    "Problems",
    "Seeds",
    "StrictModel",
    "SuiteError",
    "custom_error",
    "fail",
    "format_error",
    "glob",
    "load_file",
    "read_yaml",
    "repeats",
    "validate",
]

Loc = tuple[str | int, ...]
M = TypeVar("M", bound=BaseModel)


Problems = dict[Loc, str]
"""Problems found by a validator: field path (relative to its model) -> message."""


class StrictModel(BaseModel):
    """Base of every suite model: frozen, unknown fields refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def repeats(values: list) -> list[int]:
    """Indices of the values seen earlier in the list."""
    return [i for i, v in enumerate(values) if v in values[:i]]


class SuiteError(ConfigError):
    """A malformed suite: one line per problem, ``FILE: field.path: message``."""


def custom_error(message: str) -> PydanticCustomError:
    """A validation error whose message is ``message`` as it is."""
    return PydanticCustomError("hessbench", "{message}", {"message": message})


def fail(problems: Iterable[tuple[Loc, str]]) -> None:
    """Raise every ``(location, message)`` problem at once; no-op without problems.

    Locations are relative to the validator's model; pydantic prefixes the path
    to it.
    """
    details = [InitErrorDetails(type=custom_error(m), loc=loc, input=None) for loc, m in problems]
    if details:
        raise pydantic.ValidationError.from_exception_data("Suite", details)


def _check_name(value: str) -> str:
    ok = value[:1].isalnum() and ".." not in value
    if not ok or not all(c.isalnum() or c in "_.-" for c in value) or not value.isascii():
        raise custom_error(
            f"{value!r} is not a valid name (letters, digits, '_', '.', '-'; "
            "starting with a letter or digit; no '..'; it becomes a file name)"
        )
    return value


Name = Annotated[str, AfterValidator(_check_name)]
"""A name that is safe as a file or folder name."""


def _of_kind(accept: Callable[[object], bool], what: str) -> PlainValidator:
    """A validator that keeps values passing ``accept`` as they are (no coercion)."""

    def check(value: object) -> object:
        if not accept(value):
            raise custom_error(f"expected {what}, got {value!r}")
        return value

    return PlainValidator(check)


def _scalar(v: object) -> bool:
    return isinstance(v, (bool, int, float, str))


Number = Annotated[
    int | float | bool, _of_kind(lambda v: isinstance(v, (int, float)), "a number or boolean")
]


def _int_list(v: object) -> bool:
    return isinstance(v, list) and all(type(x) is int for x in v)


def _scalar_list(v: object) -> bool:
    return isinstance(v, list) and all(map(_scalar, v))


KwValue = Annotated[
    int | float | bool | str | list[int],
    _of_kind(lambda v: _scalar(v) or _int_list(v), "a number, boolean, string or list of integers"),
]
ParamValue = Annotated[
    int | float | bool | str | list[int | float | bool | str],
    _of_kind(
        lambda v: _scalar(v) or _scalar_list(v), "a number, boolean, string or a list of them"
    ),
]


def _unannotate(tp: Any) -> Any:
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


def _union_tags(tp: Any) -> dict[str, Any]:
    """Tag -> member of a tagged union (``kind`` literals or ``Tag`` metadata); {} otherwise."""
    if get_origin(tp) not in (Union, types.UnionType):
        return {}
    tags = {}
    for member in get_args(tp):
        tag = next((m.tag for m in getattr(member, "__metadata__", ()) if isinstance(m, Tag)), None)
        member = _unannotate(member)
        if tag is None and isinstance(member, type) and issubclass(member, BaseModel):
            kind = member.model_fields.get("kind")
            tag = get_args(kind.annotation)[0] if kind else None
        if tag is not None:
            tags[tag] = member
    return tags


def _path(loc: Loc, root: Any) -> list[str | int]:
    """``loc`` without the tags pydantic inserts for tagged unions, found by walking the types."""
    tp, out = root, []
    for part in loc:
        tp = _unannotate(tp)
        tags = _union_tags(tp)
        if isinstance(part, str) and part in tags:
            tp = tags[part]
            continue
        out.append(part)
        if isinstance(tp, type) and issubclass(tp, BaseModel) and part in tp.model_fields:
            tp = tp.model_fields[part].annotation
        else:
            tp = get_args(tp)[-1] if get_origin(tp) in (list, dict) else None
    return out


def _choices(expected: str) -> str:
    """``"'a', 'b' or 'c'"`` (pydantic's wording) -> ``"a, b, c"``."""
    found = re.findall(r"'((?:[^'\\]|\\.)*)'", expected)
    return ", ".join(found) if found else expected


def format_error(err: Any, root: Any) -> tuple[str, str]:
    """``(field.path, message)`` for one pydantic error; ``root``: the validated model class."""
    path, kind, ctx = _path(err["loc"], root), err["type"], err.get("ctx", {})
    given = repr(err.get("input"))
    given = given if len(given) <= 60 else given[:57] + "..."
    if kind == "hessbench":
        msg = err["msg"]
    elif kind in ("missing", "union_tag_not_found"):
        path += [ctx["discriminator"].strip("'")] if ctx else []
        msg = "field required"
    elif kind == "extra_forbidden":
        msg = "unknown field"
    elif kind == "literal_error":
        msg = f"{given} is not one of {_choices(ctx['expected'])}"
    elif kind == "union_tag_invalid":
        path.append(ctx["discriminator"].strip("'"))
        msg = f"{ctx['tag']!r} is not one of {_choices(ctx['expected_tags'])}"
    elif kind == "too_short":
        msg = f"needs at least {ctx['min_length']} item{'s' * (ctx['min_length'] != 1)}"
    elif kind in ("model_type", "model_attributes_type", "dict_type"):
        msg = f"expected a mapping, got {given}"
    else:
        msg = f"{err['msg'].removeprefix('Value error, ')} (got {given})"
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
    return where or "(top level)", msg


def validate(model: type[M], data: object, source: str) -> M:
    """``model.model_validate(data)``, with every problem as a line of one :class:`SuiteError`."""
    if not isinstance(data, dict):
        what = "nothing" if data is None else type(data).__name__
        raise SuiteError(f"{source}: expected a mapping of fields, got {what}")
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        lines = dict.fromkeys(": ".join((source, *format_error(e, model))) for e in exc.errors())
        raise SuiteError("\n".join(lines)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        """Build a mapping; a duplicate key is an error at its line."""
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(text: str, source: str) -> object:
    """Parse YAML safely (plain data only; a key given twice is an error).

    Raises:
        SuiteError: ``SOURCE:LINE:COL: problem`` for a syntax error.
    """
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise SuiteError(f"{where}: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise SuiteError(f"{source}: {exc}") from None


def load_file(path: str | Path, parse: Callable[[str, str], M]) -> M:
    """``parse(text, str(path))`` of the file at ``path`` (a suite parser such as ``parse_suite``).

    Raises:
        SuiteError: ``PATH: no such file`` or ``PATH: cannot read: ...``; and what
            ``parse`` raises.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SuiteError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SuiteError(f"{path}: cannot read: {exc}") from None
    return parse(text, str(path))


@functools.lru_cache(maxsize=256)
def glob(pattern: str) -> re.Pattern[str]:
    """A regex for a pattern where ``*`` matches any text and ``?`` one character.

    Everything else is literal, including ``[`` and ``]`` (they occur in labels
    such as ``hutchinson[num_samples=10]``).

    >>> bool(glob("hutchinson[*]").fullmatch("hutchinson[num_samples=10]"))
    True
    """
    parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile("".join(parts))


def _seeds_tag(value: object) -> str:
    return "list" if isinstance(value, list) else "count"


Seeds = Annotated[
    Annotated[list[Annotated[int, Field(ge=0)]], Tag("list")]
    | Annotated[Annotated[int, Field(gt=0)], Tag("count")],
    Discriminator(_seeds_tag),
]
"""Seeds: a list of seeds, or a count ``n`` meaning ``0 .. n-1``."""
