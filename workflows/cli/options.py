"""Command-line options declared by the config schema: every scalar or list field of a pydantic
section is one `--flag` (its name with dashes; its description and default as the help), so a
new config field is one edit in `pipeline/config.py`. Values arrive as given (lists as comma
text) and are validated by the schema, whose messages name the key."""

from __future__ import annotations

import functools
import inspect
import types
import typing
from typing import Any, Literal, Optional

import typer
from pydantic import BaseModel
from rich.markup import escape


def _flag_type(annotation: Any) -> type:
    """What the command line parses a field as: bool, int, float or text (lists, choices)."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    kinds = {arg for arg in typing.get_args(annotation) if arg is not type(None)} if union else {annotation}
    if kinds == {bool} or kinds == {int}:
        return kinds.pop()
    return float if kinds <= {int, float} else str


def _help(field, default: Any) -> str:
    """The field's description, its choices where it has some, and its default unless the
    description says it."""
    text = field.description or ""
    choices = [arg for arg in typing.get_args(field.annotation) if typing.get_origin(arg) is Literal]
    choices += [field.annotation] if typing.get_origin(field.annotation) is Literal else []
    inner = [item for arg in typing.get_args(field.annotation) for item in typing.get_args(arg)
             if typing.get_origin(arg) is list and typing.get_origin(item) is Literal]
    words = "|".join(str(value) for literal in choices + inner for value in typing.get_args(literal))
    if words:
        text += f" ({words})"
    if default is not None and not isinstance(default, bool) and "default" not in text:
        text += f" [{','.join(map(str, default)) if isinstance(default, list) else default}]"
    return escape(text.strip())  # rich markup would swallow "[text]"


def schema_options(section: type[BaseModel], *, skip: tuple[str, ...] = (), aliases: dict[str, str] | None = None):
    """Decorator: add one option per field of `section` (but `skip` and nested sections) to a
    Typer command, which receives the given ones as `flags: dict` (unset flags left out, so a
    config file's values stand). `aliases`: {field: extra flag name}, e.g. methods -> method."""
    aliases = aliases or {}

    def decorate(command):
        own = inspect.signature(command, eval_str=True)
        added, names = [], []
        for name, field in section.model_fields.items():
            annotation = field.annotation
            if name in skip or (inspect.isclass(annotation) and issubclass(annotation, BaseModel)):
                continue
            flag = name.replace("_", "-")
            kind = _flag_type(annotation)
            declarations = [f"--{flag}/--no-{flag}"] if kind is bool else [f"--{flag}"]
            if name in aliases:
                declarations.append(f"--{aliases[name]}")
            default = None if field.is_required() else field.get_default(call_default_factory=True)
            option = typer.Option(None, *declarations, help=_help(field, default), show_default=False)
            added.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                           annotation=Optional[kind]))
            names.append(name)

        @functools.wraps(command)
        def run(**kwargs):
            flags = {name: kwargs.pop(name) for name in names}
            return command(**kwargs, flags={name: value for name, value in flags.items() if value is not None})

        parameters = [*(parameter for parameter in own.parameters.values() if parameter.name != "flags"), *added]
        run.__signature__ = own.replace(parameters=parameters)  # type: ignore[attr-defined]
        run.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
        return run

    return decorate
