"""Each setting is declared once, as a dataclass field: its annotation is the type, ``setting()`` adds the rest.

From that one declaration come the checks of values from params.yaml and Python (``Settings``), the
parsing of command-line and sweep text (``parse_text``), the click options (``pipeline.cli``) and the
README's table of settings (``settings_table``), so a default, a choice or a range is never restated.
A refused value is one ``ConfigError`` line naming the setting, the value, what was expected and an
example, never a ``TypeError`` from deep inside a stage.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass
from typing import Any

from pipeline.common.errors import ConfigError

NULL_WORDS = ("none", "null")  # how the command line and --grid/--set spell an optional setting's null
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
_NOUNS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
_PLURALS = {int: "integers", float: "numbers", str: "strings"}


@dataclass(frozen=True)
class Bounds:
    """A numeric range; ``str()`` is how messages and the README state it."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = True

    def __contains__(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


def at_least(low: float) -> Bounds:
    return Bounds(low=low)


def above(low: float) -> Bounds:
    return Bounds(low=low, low_open=True)


FRACTION = Bounds(low=0, high=1)  # [0, 1)


@dataclass(frozen=True)
class Spec:
    """Everything about a setting except its name, type and default (which the field itself holds)."""

    help: str
    choices: tuple[str, ...] | None = None
    bounds: Bounds | None = None
    pattern: str | None = None  # a regular expression the whole value must match ...
    allowed: str | None = None  # ... and how to say it in words
    none: str | None = None  # what null means, for settings that may be null
    parse: Callable[[Any], Any] | None = None  # normalises a value of the declared type (e.g. '8GB' -> bytes)
    example: str | None = None  # shown in messages when the default is no example
    metavar: str | None = None
    env: str | None = None  # environment variable the command line falls back to


def setting(default: Any = MISSING, help: str = "", **spec: Any) -> Any:
    """A dataclass field carrying its ``Spec``; a setting without a default is required."""
    return dataclasses.field(default=default, metadata={"setting": Spec(help=help, **spec)})


# ------------------------------------------------------------------------------------------ types


@dataclass(frozen=True)
class Kind:
    """A field's annotation, reduced to what checks and parsing need."""

    types: tuple[type, ...]  # accepted scalar types (for a list: its items' types)
    optional: bool = False  # null allowed
    is_list: bool = False  # tuple[X, ...]: a comma-separated string, a list, or a single X

    def noun(self, bounds: Bounds | None = None) -> str:
        """'an integer', 'a number'; 'a finite number' where ``bounds`` leave it open above, since infinity (and nan)
        is refused too (inside a bounded range it goes without saying)."""
        if self.is_list:
            return f"a comma-separated list of {' or '.join(_PLURALS[t] for t in self.types)}"
        finite = bounds is None or bounds.high is None
        return " or ".join("a finite number" if t is float and finite else _NOUNS[t] for t in self.types)

    def accepts(self, value: Any) -> bool:
        """Strict: no bool for a number, no float for an integer; an integer is a good float."""
        if isinstance(value, bool):
            return bool in self.types
        if isinstance(value, int) and float in self.types:
            return True
        return isinstance(value, self.types)

    @property
    def item(self) -> Kind:
        return Kind(self.types)


def _kind(annotation: Any) -> Kind:
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    args = typing.get_args(annotation) if union else (annotation,)
    optional = type(None) in args
    args = tuple(a for a in args if a is not type(None))
    if len(args) == 1 and typing.get_origin(args[0]) is tuple:
        return Kind(types=(typing.get_args(args[0])[0],), optional=optional, is_list=True)
    return Kind(types=args, optional=optional)


@functools.cache
def _kinds(cls: type) -> dict[str, Kind]:
    return {name: _kind(hint) for name, hint in typing.get_type_hints(cls).items()}


def spec_of(field: dataclasses.Field) -> Spec:
    return field.metadata.get("setting") or Spec(help="")


def kind_of(cls: type, name: str) -> Kind:
    return _kinds(cls)[name]


def field_of(cls: type, name: str) -> dataclasses.Field:
    return {f.name: f for f in dataclasses.fields(cls)}[name]


def ordered_fields(cls: type) -> list[dataclasses.Field]:
    """Required settings first, then the rest in declaration order: the order of the CLI and the README."""
    fields = dataclasses.fields(cls)
    return [f for f in fields if f.default is MISSING] + [f for f in fields if f.default is not MISSING]


# ---------------------------------------------------------------------------------------- display


def show(value: Any) -> str:
    """A value as params.yaml spells it (null, true, 0,1,2)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


def default_text(field: dataclasses.Field) -> str | None:
    """The default in words: a value, or what a null default means; None for a required setting."""
    if field.default is MISSING:
        return None
    if field.default is None and spec_of(field).none:
        return spec_of(field).none
    return show(field.default)


def expected(cls: type, field: dataclasses.Field, *, null_meaning: bool = True) -> str:
    """What a setting accepts, e.g. 'an integer >= 1 or null (never stop early)'."""
    spec, kind = spec_of(field), kind_of(cls, field.name)
    if spec.choices:
        words = list(spec.choices)
        text = words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"
    elif spec.allowed:
        text = spec.allowed
    else:
        text = kind.noun(spec.bounds) + (f" {spec.bounds}" if spec.bounds else "")
    if kind.optional:
        text += " or null" + (f" ({spec.none})" if spec.none and null_meaning else "")
    return text


def _wrong_type(kind: Kind, value: Any) -> str:
    """', not a string' and the like; nothing for a number where a number is due (2.5 for an integer)."""
    numeric = not kind.is_list and bool({int, float} & set(kind.types))
    if isinstance(value, bool):
        return ", not true/false"
    if isinstance(value, (int, float)):
        return "" if numeric else f", not {'an integer' if isinstance(value, int) else 'a number'}"
    if isinstance(value, str):
        return ", not a string"
    return ", not a list" if isinstance(value, (list, tuple)) else f", not a {type(value).__name__}"


def refuse(cls: type, field: dataclasses.Field, value: Any, wrong_type: bool = False,
           fault: str | None = None) -> ConfigError:
    """The one-line message for a refused value: the setting, the value, what is wrong with it where the expected
    type alone would not say (``fault``, e.g. 'has an empty item'), what it must be, and an example."""
    spec = spec_of(field)
    said = f" {fault}; it" if fault else ""
    message = f"{field.name} {'null' if value is None else repr(value)}{said} must be {expected(cls, field)}"
    if wrong_type:
        message += _wrong_type(kind_of(cls, field.name), value)
    if spec.choices:
        pass  # the choices are the example
    elif spec.example is not None:
        message += f"; e.g. {field.name}: {spec.example}"
    elif field.default is not MISSING and field.default is not None:
        message += f"; e.g. {field.name}: {show(field.default)} (the default)"
    return ConfigError(message)


def option_name(field: dataclasses.Field) -> str:
    """The command-line spelling: batch_size -> --batch-size; a setting on by default also gets --no-..."""
    flag = "--" + field.name.replace("_", "-")
    return f"{flag}/--no-{flag[2:]}" if field.default is True else flag


# ---------------------------------------------------------------------------------- checks, parsing


def parse_list(value: str | Sequence | None, cast: type = str, name: str = "list") -> tuple | None:
    """'a,b' or a YAML list -> tuple; None/'all'/'' -> None. An empty item ('0,,1', 'a,b,') is refused: it is a
    typo whose intended value nobody can tell, not a shorter list. ``name``: the setting or option, for the message."""
    if value is None or value == "" or value == "all":
        return None
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
        if "" in items:
            raise ConfigError(f"{name} {value!r} has an empty item; write one comma between two items, "
                              f"e.g. {','.join(v for v in items if v) or 'a,b'}")
    else:
        items = list(value)
    try:
        return tuple(cast(v) for v in items)
    except ValueError as exc:
        raise ConfigError(f"cannot read {value!r} as a comma-separated list of {cast.__name__}") from exc


def parse_size(value: str | int | None) -> int | None:
    """'8GB', '512MiB', 1000000 -> bytes."""
    if value is None or isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B)?\s*", str(value), re.IGNORECASE)
    if not match:
        raise ConfigError(f"cannot read size {value!r}; write e.g. 8GB or 512MiB")
    number, unit = float(match.group(1)), match.group(2).upper()
    return int(number * 1024 ** "_KMGT".index(unit or "_")) if unit else int(number)


def _check_list(cls: type, field: dataclasses.Field, kind: Kind, value: Any) -> tuple | None:
    if isinstance(value, str):
        try:
            texts = parse_list(value) or ()
        except ConfigError:  # an empty item
            raise refuse(cls, field, value, fault="has an empty item") from None
        items = [_from_text(kind.item, v) for v in texts]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    elif kind.item.accepts(value):  # a single seed: 3 -> (3,)
        items = [value]
    else:
        raise refuse(cls, field, value, wrong_type=True)
    if not all(kind.item.accepts(v) for v in items):
        raise refuse(cls, field, value)
    if not items:
        if kind.optional:
            return None
        raise refuse(cls, field, value)
    return tuple(items)


def check_value(cls: type, field: dataclasses.Field, value: Any) -> Any:
    """The value normalised (lists to tuples, integers to floats, sizes to bytes), or ConfigError naming it."""
    spec, kind = spec_of(field), kind_of(cls, field.name)
    if value is None:
        if kind.optional:
            return None
        if field.default is MISSING:  # left out (the command line passes None): say so, and what it is for
            raise ConfigError(f"{option_name(field)} is required: {spec.help}")
        raise refuse(cls, field, value)
    if field.default is MISSING and isinstance(value, str) and not value.strip():  # --cache "": as good as left out
        raise ConfigError(f"{option_name(field)} is required (it was given empty): {spec.help}")
    if kind.is_list:
        return _check_list(cls, field, kind, value)
    if isinstance(value, os.PathLike) and kind.accepts(""):  # a pathlib.Path where a path (string) is due
        value = os.fspath(value)
    if not kind.accepts(value):
        raise refuse(cls, field, value, wrong_type=True)
    if kind.types == (float,):
        value = float(value)
    if isinstance(value, float) and not math.isfinite(value):  # inf passes '> 0'; nan passes nothing
        raise refuse(cls, field, value)
    if spec.parse is not None:
        try:
            value = spec.parse(value)
        except ConfigError:
            raise refuse(cls, field, value) from None
    if spec.choices is not None and value not in spec.choices:
        raise refuse(cls, field, value)
    if spec.bounds is not None and value not in spec.bounds:
        raise refuse(cls, field, value)
    if spec.pattern is not None and not re.fullmatch(spec.pattern, str(value)):
        raise refuse(cls, field, value)
    return value


def _from_text(kind: Kind, text: str) -> Any:
    """Command-line text as the declared type would read it; text that does not read stays text (and is refused)."""
    word = text.strip()
    if kind.optional and word.lower() in NULL_WORDS:
        return None
    if kind.is_list or str in kind.types:
        return text
    if bool in kind.types:
        return _BOOL_WORDS.get(word.lower(), text)
    for number in (int, float):
        try:
            return number(word)
        except ValueError:
            pass
    return text


def parse_text(cls: type, name: str, text: str) -> Any:
    """A setting's value from command-line text ('3', '1e-3', 'none', 'gru'), checked; ConfigError if refused."""
    field = field_of(cls, name)
    return check_value(cls, field, _from_text(kind_of(cls, name), text))


def from_mapping(cls: type, values: Mapping[str, Any]) -> Any:
    """Build a config from params.yaml-style keys; unknown keys are refused, not ignored, and so are missing (or null)
    required ones, named as params.yaml spells them."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} setting(s) {unknown}; known: {sorted(names)}")
    missing = [f.name for f in ordered_fields(cls) if f.default is MISSING and values.get(f.name) is None]
    if missing:
        raise ConfigError(f"{cls.__name__} needs {', '.join(missing)}; set {'it' if len(missing) == 1 else 'them'}")
    return cls(**values)


@dataclass(frozen=True)
class Settings:
    """Base of the configs: every field is checked and normalised against its declaration on construction."""

    def __post_init__(self) -> None:
        cls = type(self)
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, check_value(cls, field, getattr(self, field.name)))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (tuples as lists), as the store and the run directory record them."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Any:
        return from_mapping(cls, values)


# ----------------------------------------------------------------------------------------- README


def _cell(text: str) -> str:
    """Table-safe: pipes escaped, and '<task>' kept from reading as an HTML tag."""
    return re.sub(r"<(?=[A-Za-z/])", "&lt;", text.replace("|", "\\|"))


def settings_table(cls: type) -> str:
    """A markdown table of one config's settings, as the README shows it."""
    rows = ["| setting | option | values | default | meaning |", "|---|---|---|---|---|"]
    for field in ordered_fields(cls):
        spec, default = spec_of(field), default_text(field)
        shown = "required" if default is None else (f"`{default}`" if default == show(field.default) else default)
        values = expected(cls, field, null_meaning=field.default is not None)  # else the default says it
        rows.append(f"| `{field.name}` | `{option_name(field)}` | {_cell(values)} | {_cell(shown)} | "
                    f"{_cell(spec.help)} |")
    return "\n".join(rows) + "\n"
