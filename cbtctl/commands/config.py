"""``cbtstream config``: the effective configuration, and the reference of every setting.

``show`` prints the configuration in effect (environment over the TOML file) as TOML, or the
defaults (``--defaults``), or JSON (``--json``). A secret is never printed: every ``SecretStr``
is shown as ``**********`` (or unset); ``*_file`` settings are paths and are shown as such.

``reference`` prints ``docs/configuration.md``, generated from the settings models
(``cbtstream.config``): every setting with its dotted name, environment variable, type, default
and description, nested sections (``copier.vddk``) and lists of tables (``copier.targets``)
included. Descriptions are the ``#:`` comments above the fields (Sphinx's convention, read from
the source with ``ast``), or a field's ``Field(description=...)`` where it has one; a section's
is its model's docstring. ``tests/unit/test_config_reference.py`` fails when the committed file
drifts from the models or a setting has no description.
"""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
import json
import os
import re
import textwrap
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from cbtstream.config import Settings

#: How a secret is shown.
MASK = "**********"
#: How to regenerate the reference (named by the drift test's message).
REGENERATE = "cbtstream config reference > docs/configuration.md"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "config",
        help="show the configuration in effect, or the reference of every setting",
        description="'show' prints the configuration in effect (CBTSTREAM_* environment "
        "variables over the --config/CBTSTREAM_CONFIG TOML file) as TOML, with secrets "
        "masked; --defaults prints the defaults instead, --json prints JSON. 'reference' "
        f"prints the Markdown reference of every setting ({REGENERATE}).",
    )
    p.add_argument("action", choices=("show", "reference"))
    p.add_argument("--defaults", action="store_true",
                   help="show: the defaults, not the configuration in effect")
    p.add_argument("--json", action="store_true", help="show: JSON instead of TOML")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "reference":
        print(reference(), end="")
        return 0
    shown = Settings.model_construct() if args.defaults else settings
    if args.json:
        print(json.dumps(plain(shown), indent=2))
    else:
        source = "defaults" if args.defaults else (
            f"environment (CBTSTREAM_*) over {os.environ['CBTSTREAM_CONFIG']}"
            if os.environ.get("CBTSTREAM_CONFIG") else "environment (CBTSTREAM_*) and defaults")
        print(f"# cbtstream configuration: {source}; secrets masked")
        print(show_toml(shown, None if args.defaults else Settings.model_construct()), end="")
    return 0


# -- show -----------------------------------------------------------------------------------
def plain(model: BaseModel) -> dict[str, Any]:
    """The settings as JSON-able values, every secret masked (unset stays None)."""

    def value(v: Any) -> Any:
        if isinstance(v, SecretStr):
            return MASK
        if isinstance(v, BaseModel):
            return plain(v)
        if isinstance(v, tuple | list):
            return [value(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v

    return {name: value(getattr(model, name)) for name in type(model).model_fields}


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string is a TOML basic string


def show_toml(settings: BaseModel, defaults: BaseModel | None) -> str:
    """TOML for ``settings`` (secrets masked; unset values as comments). With ``defaults``,
    each value that differs from its default says the default in a comment (a secret says only
    that it differs: the comparison is of the secret values, the output shows neither)."""
    out: list[str] = []

    def table(header: str, model: BaseModel, base: BaseModel | None) -> None:
        subs: list[tuple[str, Any, Any]] = []
        if header:
            out.append(f"\n{header}")
        shown, default_shown = plain(model), plain(base) if base is not None else {}
        for name in type(model).model_fields:
            v, d = getattr(model, name), getattr(base, name, None)
            if isinstance(v, BaseModel) or (isinstance(v, tuple) and v
                                            and isinstance(v[0], BaseModel)):
                subs.append((name, v, d))
                continue
            text = shown[name]
            line = f"# {name} = (unset)" if text is None else f"{name} = {_toml(text)}"
            if base is not None and v != d:
                was = default_shown[name]
                line += f"  # default: {'unset' if was is None else _toml(was)}"
            out.append(line)
        for name, v, d in subs:
            path = f"{header.strip('[]')}.{name}" if header else name
            if isinstance(v, BaseModel):
                table(f"[{path}]", v, d if isinstance(d, BaseModel) else None)
            else:
                for item in v:
                    table(f"[[{path}]]", item, None)

    table("", settings, defaults)
    return "\n".join(out) + "\n"


# -- reference ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One setting as the reference shows it."""

    name: str
    env: str
    type: str
    default: str
    description: str


@dataclass(frozen=True)
class Section:
    """A table of settings: a settings model at a dotted path."""

    name: str
    description: str
    entries: tuple[Entry, ...]


@functools.cache
def field_comments(cls: type[BaseModel]) -> dict[str, str]:
    """The ``#:`` comment lines right above each field of ``cls``, joined, by field name."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    classdef = ast.parse(source).body[0]
    assert isinstance(classdef, ast.ClassDef)
    found: dict[str, str] = {}
    for node in classdef.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            i, text = node.lineno - 2, list[str]()
            while i >= 0 and lines[i].strip().startswith("#:"):
                text.insert(0, lines[i].strip()[2:].strip())
                i -= 1
            if text:  # a line ending in "/" (a wrapped path) continues without a space
                found[node.target.id] = re.sub(r"/ ", "/", " ".join(text))
    return found


def _model_in(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The settings model a field holds (and whether as a list of them), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    if typing.get_origin(annotation) is tuple:
        item = typing.get_args(annotation)[0]
        if isinstance(item, type) and issubclass(item, BaseModel):
            return item, True
    return None, False


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        # None is left out: such a setting's default is "unset"
        return " \\| ".join(_type_name(a) for a in args if a is not type(None))
    if origin is tuple:
        return f"list of {_type_name(args[0])}"
    if annotation is SecretStr:
        return "secret"
    if annotation is Path:
        return "path"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(field: FieldInfo) -> str:
    parts = []
    for m in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                parts.append(f"{sign} {getattr(m, attr)}")
        if getattr(m, "pattern", None):
            parts.append(f"matching `{m.pattern}`")
    return f" ({', '.join(parts)})" if parts else ""


def _default(field: FieldInfo) -> str:
    v = field.get_default(call_default_factory=True)
    if v is None:
        return "unset"
    if isinstance(v, SecretStr):
        return f"`{MASK}`"
    if isinstance(v, tuple | list):
        return f"`{_toml([str(x) for x in v])}`"
    if isinstance(v, Path):
        return f"`{_toml(str(v))}`"
    text = f"`{_toml(v)}`"
    if isinstance(v, int) and not isinstance(v, bool) and v >= 1 << 20 and v % (1 << 20) == 0:
        text += f" ({v >> 20} MiB)"
    return text


def _markdown(text: str) -> str:
    """A ``#:`` comment (reStructuredText literals) as a Markdown table cell."""
    return re.sub(r"``(.+?)``", r"`\1`", text).replace("|", "\\|")


def sections(model: type[BaseModel] = Settings, path: str = "", env: str | None = "CBTSTREAM_",
             description: str = "") -> Iterator[Section]:
    """The reference's tables: ``model``'s own settings, then those of each nested model (in
    field order). ``env`` is the variables' prefix; None inside a list (set as JSON)."""
    entries: list[Entry] = []
    nested: list[tuple[str, type[BaseModel], str | None]] = []
    comments = field_comments(model)
    for name, field in model.model_fields.items():
        dotted = f"{path}{name}"
        var = f"{env}{name.upper()}" if env is not None else None
        inner, is_list = _model_in(field.annotation)
        if inner is not None and not is_list:
            nested.append((dotted, inner, f"{var}__" if var else None))
            continue
        if inner is not None:
            nested.append((f"{dotted}[]", inner, None))
        text = field.description or comments.get(name, "")
        where = f"`{var}`" if var else f"inside the JSON of `{_list_var(path)}`"
        entries.append(Entry(
            name=dotted, env=where,
            type=(f"list of tables (`{dotted}[]` below)" if inner is not None
                  else _type_name(field.annotation) + _bounds(field)),
            default=_default(field), description=_markdown(text)))
    yield Section(path.rstrip(".") or "(top level)", description, tuple(entries))
    for dotted, inner, var in nested:
        doc = " ".join((inner.__doc__ or "").split())
        yield from sections(inner, f"{dotted}.", var, _markdown(doc))


def _list_var(path: str) -> str:
    """The variable holding a list of tables, for a setting inside one (``copier.targets[].``)."""
    return "CBTSTREAM_" + "__".join(p.upper() for p in path.rstrip(".").rstrip("[]").split("."))


def reference() -> str:
    """``docs/configuration.md``."""
    out = [
        "# Configuration reference",
        "",
        f"Generated from the settings models (`cbtstream/config.py`) by `{REGENERATE}`; do not "
        "edit by hand (a unit test fails when this file and the models differ).",
        "",
        "Every setting is read from an environment variable (prefix `CBTSTREAM_`, nested "
        "sections joined by `__`) or from the TOML file named by `--config` or "
        "`CBTSTREAM_CONFIG` (one table per section: `[kafka]`, `[copier.vddk]`, "
        "`[[copier.targets]]`); the environment wins over the file. Lists are JSON in the "
        "environment (`CBTSTREAM_COPIER__NBD_ALLOW='[\"127.0.0.1\"]'`), arrays in TOML; a "
        "nested section may also be given whole, as JSON, in its own variable "
        "(`CBTSTREAM_COPIER__VDDK='{\"libdir\": \"/opt/vmware-vix-disklib-distrib\"}'`).",
        "",
        "Secrets (type `secret`) are never printed: logs, errors and `cbtstream config show` "
        "mask them; most have a `*_file` setting that reads them from a file. `cbtstream config "
        "show` prints the configuration in effect (`--defaults`: the defaults, `--json`: as "
        "JSON).",
    ]
    for section in sections():
        out += ["", f"## `{section.name}`" if section.name != "(top level)" else "## Top level"]
        if section.description:
            out += ["", section.description]
        out += ["", "| setting | environment variable | type | default | description |",
                "|---|---|---|---|---|"]
        out += [f"| `{e.name}` | {e.env} | {e.type} | {e.default} | {e.description} |"
                for e in section.entries]
    return "\n".join(out) + "\n"
