"""Command-line options generated from the stages' config models, so every field a recipe can set
is an option of the matching command under the same name (``image_size`` -> ``--image-size``),
and no default or rule is restated in the CLI: unset options leave the model's default."""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import typer
import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

_PREFIX = "cfg__"
_SIMPLE = (int, float, str, bool, Path)


def _option_type(annotation: Any) -> tuple[Any, bool, str]:
    """(the type typer parses, whether the value is YAML text to parse, a choices hint)."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _option_type(args[0])
        return str, True, ""
    if origin is Literal:
        return str, False, "one of " + ", ".join(str(a) for a in typing.get_args(annotation))
    if annotation in _SIMPLE:
        return annotation, False, ""
    return str, True, "YAML"


def _default_text(field: Any) -> str:
    if field.default_factory is not None:
        return "see the config"
    if field.default is PydanticUndefined:
        return "required"
    return "none" if field.default is None else str(field.default)


def config_options(
    model: type[BaseModel],
    *,
    exclude: Iterable[str] = (),
    aliases: Mapping[str, str] | None = None,
    param: str = "config",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give the decorated command one option per field of `model` (but `exclude`); it receives
    the options given as a dict in its parameter `param`. `aliases` adds another spelling
    (``{"num_workers": "--workers"}``; for a bool, ``"--gpu/--cpu"``)."""
    skip = set(exclude)
    aliases = dict(aliases or {})

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn)
        params = [p for p in sig.parameters.values() if p.name != param]
        parse: dict[str, bool] = {}
        annotations: dict[str, Any] = {}
        for name, field in model.model_fields.items():
            if name in skip:
                continue
            kind, yaml_text, hint = _option_type(field.annotation)
            flag = name.replace("_", "-")
            decls = [f"--{flag}/--no-{flag}"] if kind is bool else [f"--{flag}"]
            if name in aliases:
                decls.append(aliases[name])
            words = [field.description or "", hint, f"(default: {_default_text(field)})"]
            option = typer.Option(*decls, help=" ".join(w for w in words if w), show_default=False)
            pname = _PREFIX + name
            annotations[pname] = Annotated[kind | None, option]  # type: ignore[valid-type]
            params.append(inspect.Parameter(pname, inspect.Parameter.KEYWORD_ONLY, default=None))
            parse[name] = yaml_text

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            given: dict[str, Any] = {}
            for key in [k for k in kwargs if k.startswith(_PREFIX)]:
                value = kwargs.pop(key)
                name = key.removeprefix(_PREFIX)
                if value is None:
                    continue
                given[name] = yaml.safe_load(value) if parse[name] else value
            return fn(*args, **{param: given}, **kwargs)

        hints = typing.get_type_hints(fn, include_extras=True)
        params = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in params]
        params = [p.replace(annotation=annotations.get(p.name, p.annotation)) for p in params]
        wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        del wrapper.__wrapped__  # typer must read the signature above, not the undecorated one
        return wrapper

    return decorate
