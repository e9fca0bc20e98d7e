"""One small validation helper for every configuration section, driven by dataclass fields.

A section is a dataclass whose fields are declared with :func:`setting`: the type comes
from the annotation, the default, the constraint and the documentation from the call, so a
new key is one line::

    @dataclass(frozen=True)
    class Example:
        tau: float = setting(5.0, minimum=0.0, min_open=True, doc="Gumbel temperature")
        policy_objective: str = setting("train", choices=("train", "heldout"), doc="...")

    Example_cfg = parse_section(Example, {"tau": 2}, "autoft")   # Example(tau=2.0, ...)

Why in-house and not pydantic v2: the sections need exactly what this file does (strict
scalar types, so that tau "5" or True is refused; choices; bounds; nested sections; a
"did you mean" hint for a misspelt key) and one wording for each kind of mistake, which
names ``section.key`` and the bad value. pydantic would add a dependency whose messages
("Input should be a valid number") would have to be rewritten error by error to say the
same, and whose model classes would replace the plain dataclasses the rest of the code
(and ``dataclasses.asdict`` / ``replace``) already uses.

Supported annotations: ``bool``, ``int``, ``float``, ``str``, ``Path``, ``X | None``,
``list[X]`` / ``tuple[X, ...]`` (a single value is taken as a one-element list, ``None`` as
an empty one) and nested section dataclasses (a mapping, or ``None`` for the defaults).
Constraints (``minimum``, ``maximum``, ``choices``) apply to each element of a list.
Cross-key rules go in a ``check(self, section)`` method, called after the fields parsed.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from pathlib import Path
from typing import Any, Callable, Mapping

__all__ = ["ConfigError", "setting", "parse_section", "section_to_dict", "reject_unknown",
           "markdown_table",
           "field_docs"]

_META = "autoft_setting"


class ConfigError(ValueError):
    """A problem with the experiment configuration; the CLI prints it in one line, exit 2."""


@dataclasses.dataclass(frozen=True)
class _Rule:
    doc: str
    minimum: float | None = None
    maximum: float | None = None
    min_open: bool = False
    max_open: bool = False
    choices: tuple | None = None
    before: Callable | None = None   # (value, where, ctx) -> value, before the type check
    after: Callable | None = None    # (value, where, ctx) -> value, after it
    key: str | None = None           # the YAML key, when it differs from the field name


def setting(default: Any = dataclasses.MISSING, *, doc: str, minimum: float | None = None,
            maximum: float | None = None, min_open: bool = False, max_open: bool = False,
            choices: tuple | None = None, before: Callable | None = None,
            after: Callable | None = None, key: str | None = None):
    """Declare one configuration key: default (omit it for a required key), bounds
    (``min_open`` / ``max_open`` make them strict), allowed ``choices``, hooks for
    irregular values and the one-line ``doc``. A list or dict default is copied per
    instance.

    Example::

        lr: float = setting(1e-3, minimum=0.0, min_open=True, doc="learning rate")
    """
    rule = _Rule(doc, minimum, maximum, min_open, max_open,
                 tuple(choices) if choices is not None else None, before, after, key)
    meta = {_META: rule}
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _rule(f: dataclasses.Field) -> _Rule:
    return f.metadata.get(_META) or _Rule(doc="")


def _yaml_key(f: dataclasses.Field) -> str:
    return _rule(f).key or f.name


def _label(section: str) -> str:
    # Top-level sections read "in finetune config"; nested ones name their path.
    return f"{section} config" if section.isidentifier() else section


def join(section: str, key: str) -> str:
    """The name of ``key`` inside ``section`` as messages spell it.

    Example:
        >>> join("autoft", "tau"), join("data.numeric 'price'", "mode")
        ('autoft.tau', "data.numeric 'price': mode")
    """
    return f"{section}: {key}" if section.endswith("'") else f"{section}.{key}"


def reject_unknown(given: Mapping, known, section: str, error=ConfigError) -> None:
    """Raise ``error`` for the first key of ``given`` not in ``known``, with a "did you
    mean" hint and the list of known keys.

    Example:
        >>> reject_unknown({"lrr": 1}, ["lr", "epochs"], "finetune")
        Traceback (most recent call last):
        ...
        autoft_fast.config.schema.ConfigError: unknown key 'lrr' in finetune config; did you mean 'lr'? known keys: lr, epochs
    """
    known = list(known)
    for k in given:
        if k not in known:
            close = difflib.get_close_matches(str(k), known, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ";"
            raise error(f"unknown key {k!r} in {_label(section)}{hint} known keys: "
                        f"{', '.join(known)}")


def _fail(error, where: str, what: str, value) -> None:
    raise error(f"{where} must be {what}, got {value!r}")


def _bounds(rule: _Rule) -> str:
    parts = []
    if rule.minimum is not None:
        parts.append(f"{'>' if rule.min_open else '>='} {rule.minimum:g}")
    if rule.maximum is not None:
        parts.append(f"{'<' if rule.max_open else '<='} {rule.maximum:g}")
    return " and ".join(parts)


# YAML 1.1 (PyYAML) reads `1e-3` as the text "1e-3" (its floats need a dot); YAML 1.2 and
# everyone writing `lr: 1e-3` read a number. A setting that takes a number takes it too.
# (Only there: unquoted hashed ids such as Avazu's `3e814130` stay text everywhere else.)
_EXPONENT_NUMBER = re.compile(r"[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+")


def _scalar(tp, value, where: str, rule: _Rule, error, ctx):
    if dataclasses.is_dataclass(tp):
        return parse_section(tp, value, where, ctx=ctx, error=error)
    if tp in (int, float) and isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
        value = float(value.replace("_", ""))
    if tp is bool:
        if not isinstance(value, bool):
            _fail(error, where, "true or false", value)
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and not (math.isfinite(value) and value.is_integer())):
            _fail(error, where, "an integer", value)
        value = int(value)
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            _fail(error, where, "a finite number", value)
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            _fail(error, where, "a string", value)
    elif tp is Path:
        if not isinstance(value, (str, Path)) or not str(value):
            _fail(error, where, "a path", value)
        value = Path(value).expanduser()
    elif tp is Any:
        pass
    else:  # pragma: no cover - a declaration mistake, not a user one
        raise TypeError(f"{where}: unsupported setting type {tp!r}")
    if rule.choices is not None and value not in rule.choices:
        _fail(error, where, f"one of {list(rule.choices)}", value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = rule.minimum, rule.maximum
        if (lo is not None and (value < lo or (rule.min_open and value == lo))) or \
                (hi is not None and (value > hi or (rule.max_open and value == hi))):
            _fail(error, where, _bounds(rule), value)
    return value


def _element(where: str, i: int, v, elem) -> str:
    # A list entry that is a named section reads "data.numeric 'price'", others "x[1]".
    if dataclasses.is_dataclass(elem) and isinstance(v, Mapping) and isinstance(v.get("name"), str):
        return f"{where} {v['name']!r}"
    return f"{where}[{i}]"


def _value(tp, value, where: str, rule: _Rule, error, ctx):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)]
        if value is None:
            return None
        return _value(inner[0], value, where, rule, error, ctx)
    if origin in (list, tuple):
        elem = args[0]
        if value is None:
            value = []
        elif not isinstance(value, (list, tuple)):
            value = [value]
        out = [_scalar(elem, v, _element(where, i, v, elem), rule, error, ctx)
               for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if value is None and dataclasses.is_dataclass(tp):
        value = {}
    return _scalar(tp, value, where, rule, error, ctx)


_HINTS: dict[type, dict] = {}


def _hints(cls) -> dict:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def parse_section(cls, raw: Mapping | None, section: str, *, ctx: dict | None = None,
                  error=None):
    """Build the section dataclass ``cls`` from the YAML mapping ``raw`` (``None``: all
    defaults), checking every key; raises ``error`` (default: the class's ``error``
    attribute, else ConfigError) naming ``section.key`` and the bad value.

    Example:
        >>> from autoft_fast.config import TrainConfig
        >>> parse_section(TrainConfig, {"lr": 0.01}, "finetune").lr
        0.01
    """
    error = error or getattr(cls, "error", ConfigError)
    ctx = ctx or {}
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise error(f"{section} must be a mapping, got {type(raw).__name__} {raw!r}")
    flds = [f for f in dataclasses.fields(cls) if f.init]
    reject_unknown(raw, [_yaml_key(f) for f in flds], section, error)
    hints = _hints(cls)
    values = {}
    for f in flds:
        rule, key = _rule(f), _yaml_key(f)
        where = join(section, key)
        if key not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise error(f"{_label(section)}: required key {key!r} is missing")
            if rule.after is None:
                continue  # the declared default, already valid
            v = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        else:
            v = raw[key]
            if rule.before is not None:
                v = rule.before(v, where, ctx)
            v = _value(hints[f.name], v, where, rule, error, ctx)
        if rule.after is not None:
            v = rule.after(v, where, ctx)
        values[f.name] = v
    obj = cls(**values)
    check = getattr(obj, "check", None)
    if callable(check):
        check(section)
    return obj


def section_to_dict(obj) -> dict:
    """A plain, YAML-safe dict of a parsed section (YAML keys, Paths as strings, tuples as
    lists) that :func:`parse_section` accepts again.

    Example:
        >>> from autoft_fast.config import TrainConfig
        >>> section_to_dict(TrainConfig())["optimizer"]
        'adam'
    """
    def plain(v):
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return section_to_dict(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v
    return {_yaml_key(f): plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}


def field_docs(cls) -> dict[str, str]:
    """``{key: doc}`` of a section (for help texts and docs).

    Example:
        >>> from autoft_fast.config import AutoFTConfig
        >>> "temperature" in field_docs(AutoFTConfig)["tau"]
        True
    """
    return {_yaml_key(f): _rule(f).doc for f in dataclasses.fields(cls) if f.init}


def markdown_table(cls) -> str:
    """The keys of a section as a markdown table (key, default, doc): what docs/models.md
    holds for ``autoft:``, so the docs are made from the one declaration.

    Example:
        >>> from autoft_fast.config import AutoFTConfig
        >>> markdown_table(AutoFTConfig).splitlines()[0]
        '| key | default | what and why |'
    """
    docs = field_docs(cls)
    rows = ["| key | default | what and why |", "| --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        v = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        if v is None:
            v = "null"
        elif isinstance(v, bool):
            v = str(v).lower()
        elif isinstance(v, str):
            v = f"`{v}`"
        rows.append(f"| `{_yaml_key(f)}` | {v} | {docs[_yaml_key(f)]} |")
    return "\n".join(rows)
