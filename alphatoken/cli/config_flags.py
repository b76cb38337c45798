"""AlphaTokenConfig on the command line and in YAML, generated from `dataclasses.fields(AlphaTokenConfig)`.

Every field gets a flag `--field-name` (or `--valuation-field-name` where the command already uses that name,
e.g. `train --lr` is the optimizer's step size, so the valuation's η is `--valuation-lr`), typed from the
field's annotation, with the help text taken from the class docstring and the default stated:

    bool                      --x / --no-x
    int, float                a number (floats must be finite)
    str                       text; the choices when config.py lists them (SELECTIONS, PATHS, TARGETS, ...)
    tuple                     a comma list: --always-keep-token-ids 2,5
    Union[str, int]           an int when it looks like one, else the text (tracked_layers: all, 2, a regex)
    Optional[torch.dtype]     a dtype name: float32, bfloat16, torch.float16, none
    Optional[...]             "none" is None

A new field of AlphaTokenConfig gets its flag and YAML key with no change here. `coerce` applies the same
typing to YAML values (a YAML string "1e-4" is a float; "false" is not a bool: it is refused).
"""
from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import math
import re
import typing
from functools import lru_cache
from typing import Any, Optional

from ..errors import UserError

# flag names a command already uses for something else: the field's flag becomes --valuation-<name>
RESERVED = {"train": {"lr"}}
# fields a command sets through its own flag (demo --keep-ratio, default 0.8)
SKIP = {"demo": {"keep_ratio"}}
DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64", "half", "float", "double")


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    name: str
    kind: str            # bool | int | float | str | tuple | str_or_int | dtype | device
    optional: bool       # None is a valid value ("none" on the command line)
    default: Any
    choices: Optional[tuple]
    doc: str

    def flag(self, command: str) -> str:
        base = self.name.replace("_", "-")
        return f"--valuation-{base}" if self.name in RESERVED.get(command, set()) else f"--{base}"

    @property
    def dest(self) -> str:
        return f"cfg_{self.name}"


def _docs(cls) -> dict:
    """Field name -> its description, parsed from the config class's docstring ("name: text", continued by
    deeper-indented lines; "a / b: text" describes both)."""
    out: dict = {}
    current: list = []
    import inspect

    for line in inspect.cleandoc(cls.__doc__ or "").splitlines():
        m = re.match(r"^([A-Za-z_][\w]*(?:\s*/\s*[A-Za-z_][\w]*)*):\s+(.*)$", line)
        if m:
            current = [n.strip() for n in m.group(1).split("/")]
            for n in current:
                out[n] = m.group(2).strip()
        elif current and line[:1].isspace() and line.strip():
            for n in current:
                out[n] += " " + line.strip()
        else:
            current = []
    return out


def _classify(tp) -> tuple[str, bool]:
    import torch

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    optional = False
    if origin is typing.Union:
        non_none = tuple(a for a in args if a is not type(None))
        optional = len(non_none) < len(args)
        if len(non_none) == 1:
            kind, _ = _classify(non_none[0])
            return kind, optional
        if set(non_none) == {str, int}:
            return "str_or_int", optional
        if torch.device in non_none:
            return "device", optional
        if torch.dtype in non_none:
            return "dtype", optional
        return "str", optional
    if origin is typing.Literal:
        return "str", False
    if tp is bool:
        return "bool", False
    if tp is int:
        return "int", False
    if tp is float:
        return "float", False
    if tp in (tuple, list) or origin in (tuple, list, collections.abc.Sequence, typing.Sequence):
        return "tuple", False
    if tp is torch.dtype:
        return "dtype", False
    if tp is torch.device:
        return "device", False
    return "str", False


def field_specs(cls=None) -> tuple:
    """One FieldSpec per field of AlphaTokenConfig (or of the dataclass `cls`), in declaration order."""
    if cls is None:
        from ..config import AlphaTokenConfig as cls
    return _field_specs(cls)


@lru_cache(maxsize=8)
def _field_specs(cls) -> tuple:
    import sys

    config_module = sys.modules.get(cls.__module__)
    hints = typing.get_type_hints(cls, vars(config_module) if config_module else None)
    docs = _docs(cls)
    specs = []
    for f in dataclasses.fields(cls):
        kind, optional = _classify(hints.get(f.name, str))
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        choices = None
        hint = hints.get(f.name, str)
        literal = [t for t in (typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,))
                   if typing.get_origin(t) is typing.Literal]
        if literal:
            choices = tuple(typing.get_args(literal[0]))
        for const in (f.name.upper(), f.name.upper() + "S", f.name.upper() + "ES"):
            value = getattr(config_module, const, None) if config_module else None
            if choices is None and kind == "str" and isinstance(value, tuple) and all(isinstance(v, str) for v in value):
                choices = value
                break
        specs.append(FieldSpec(f.name, kind, optional or default is None, default, choices,
                               docs.get(f.name, f.name.replace("_", " "))))
    return tuple(specs)


def show_default(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value) if value else "empty"
    return str(value).replace("torch.", "")


# ------------------------------------------------------------------------------------------------- parsing


def _dtype(text: str):
    import torch

    name = text.strip().lower().removeprefix("torch.")
    value = getattr(torch, name, None) if name in DTYPE_NAMES else None
    if not isinstance(value, torch.dtype):
        raise ValueError(f"not a floating dtype name (use one of {', '.join(DTYPE_NAMES[:4])} or none)")
    return value


def _int(text: str) -> int:
    text = text.strip()
    if not re.fullmatch(r"[+-]?\d+", text):
        raise ValueError("not an integer")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("not a finite number")
    return value


def parse_text(spec: FieldSpec, text: str):
    """A command-line string as a value of the field's type; ValueError with the reason."""
    if spec.optional and text.strip().lower() in ("none", "null"):
        return None
    if spec.kind == "int":
        return _int(text)
    if spec.kind == "float":
        return _float(text)
    if spec.kind == "tuple":
        items = [t.strip() for t in text.split(",") if t.strip()]
        return tuple(int(t) if re.fullmatch(r"[+-]?\d+", t) else t for t in items)
    if spec.kind == "str_or_int":
        return _int(text) if re.fullmatch(r"\s*[+-]?\d+\s*", text) else text
    if spec.kind == "dtype":
        return _dtype(text)
    if spec.kind == "bool":
        raise ValueError("use the --x / --no-x flags")
    if spec.choices is not None and text not in spec.choices:
        raise ValueError(f"choose from {', '.join(spec.choices)}")
    return text


def coerce(spec: FieldSpec, value, where: str):
    """A YAML (or saved-settings) value as the field's type; UserError naming `where` and the field otherwise."""
    def bad(reason: str):
        return UserError(f"{where}: {spec.name} {value!r}: {reason}")

    if value is None:
        if spec.optional:
            return None
        raise bad(f"must be set ({spec.kind}); leave the key out for the default {show_default(spec.default)}")
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise bad("must be true or false (a YAML boolean, not a string or number)")
        return value
    if isinstance(value, bool):
        raise bad(f"must be {'a number' if spec.kind in ('int', 'float') else 'a ' + spec.kind}, not a boolean")
    if spec.kind == "tuple":
        if isinstance(value, (list, tuple)):
            items = list(value)
        elif isinstance(value, (int, str)):
            items = [value] if isinstance(value, int) else None
            if items is None:
                try:
                    return parse_text(spec, value)
                except ValueError as err:
                    raise bad(str(err)) from None
        else:
            raise bad("must be a list")
        if any(isinstance(v, bool) or not isinstance(v, (int, str)) for v in items):
            raise bad("must be a list of integers")
        return tuple(items)
    if spec.kind == "int" and isinstance(value, int):
        return value
    if spec.kind == "float" and isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise bad("must be a finite number")
        return float(value) if isinstance(value, float) else value
    if spec.kind == "str_or_int" and isinstance(value, int):
        return value
    if spec.kind == "dtype" and not isinstance(value, str):
        import torch

        if isinstance(value, torch.dtype):
            return value
        raise bad("must be a dtype name such as bfloat16")
    if isinstance(value, str):
        try:
            return parse_text(spec, value)
        except ValueError as err:
            raise bad(str(err)) from None
    raise bad(f"must be {spec.kind.replace('_', ' or ')}, got {type(value).__name__}")


def coerce_all(values: dict, where: str) -> dict:
    """`coerce` for each key of a mapping of AlphaTokenConfig fields; UserError for an unknown key."""
    specs = {s.name: s for s in field_specs()}
    unknown = sorted(set(values) - set(specs))
    if unknown:
        raise UserError(f"{where}: unknown AlphaToken setting(s) {unknown}; valid: {sorted(specs)}")
    return {k: coerce(specs[k], v, where) for k, v in values.items()}


# -------------------------------------------------------------------------------------------------- flags


def _type_for(spec: FieldSpec, flag: str):
    def convert(text: str):
        try:
            return parse_text(spec, text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None

    convert.__name__ = spec.kind  # argparse names the type in its error
    return convert


def add_config_flags(parser: argparse.ArgumentParser, command: str, defaults: Optional[dict] = None,
                     title: str = "valuation (AlphaTokenConfig; YAML: the alphatoken: mapping)", cls=None) -> None:
    """One flag per AlphaTokenConfig field (see the module docstring); `defaults` overrides the defaults stated
    in --help where the command applies its own (the demo). `cls`: another config dataclass (tests)."""
    group = parser.add_argument_group(title)
    shown = {s.name: s.default for s in field_specs(cls)} | dict(defaults or {})
    for spec in field_specs(cls):
        if spec.name in SKIP.get(command, set()):
            continue
        flag = spec.flag(command)
        doc = spec.doc.replace("%", "%%").rstrip(".")
        help_text = f"{doc} (default: {show_default(shown[spec.name])})"
        if spec.kind == "bool":
            group.add_argument(flag, dest=spec.dest, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        else:
            metavar = {"tuple": "A,B,...", "dtype": "DTYPE", "int": "N", "float": "X", "device": "DEVICE",
                       "str_or_int": "all|K|REGEX"}.get(spec.kind, "TEXT")
            if spec.choices:
                metavar = "{" + ",".join(spec.choices) + "}"
            group.add_argument(flag, dest=spec.dest, type=_type_for(spec, flag), default=None, metavar=metavar,
                               help=help_text)


def config_from_args(args, cls=None) -> dict:
    """The AlphaTokenConfig fields given as flags (absent flags are left out)."""
    out = {}
    for spec in field_specs(cls):
        value = getattr(args, spec.dest, None)
        if value is not None:
            out[spec.name] = value
    return out
