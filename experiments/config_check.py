"""Config values checked against what they configure, before anything is built, so that an error names the key.

Every node with a `_target_` is checked against the signature of its target: a value whose type the parameter's
annotation cannot take (`trainer.max_steps=abc` for `max_steps: int`, `model.optimizer.lr=fast`) or a choice
outside a `Literal` is reported as `<full key>=<value>: expected ...`. Optimizer and scheduler rates must not be
negative (torch would say "Invalid learning rate" without naming the key). A handful of top-level keys have
fixed types. Anything the annotations cannot decide (no annotation, `Any`, a class, a container) passes: this
catches typos of type, it does not replace the constructors' own checks.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Iterator
from typing import Any

from omegaconf import DictConfig, OmegaConf

TOP_LEVEL_TYPES: dict[str, tuple[type, ...]] = {
    "seed": (int,), "threads": (int, type(None)), "test_after_fit": (bool,), "task": (str,),
    "ckpt_path": (str, type(None)), "experiment_name": (str,),
}
RATE_KEYS = ("lr", "max_lr", "weight_decay", "eps", "eta_min")
_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}


class ConfigTypeError(ValueError):
    """A config value of the wrong type or out of range; the message names the key."""


def _scalar_kinds(annotation: Any) -> set[Any] | None:
    """The scalar types (int, float, bool, str, None, or a Literal's values as a tuple) an annotation admits;
    None when it admits anything else (a class, a container, Any), i.e. when we cannot judge a value."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return None
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        kinds: set[Any] = set()
        for arg in typing.get_args(annotation):
            sub = _scalar_kinds(arg)
            if sub is None:
                return None
            kinds |= sub
        return kinds
    if origin is typing.Literal:
        return {("literal", tuple(typing.get_args(annotation)))}
    if annotation in (int, float, bool, str, type(None), None):
        return {type(None) if annotation is None else annotation}
    return None


def _fits(value: Any, kinds: set[Any]) -> bool:
    for kind in kinds:
        if isinstance(kind, tuple):
            if value in kind[1]:
                return True
        elif kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            return True
        elif kind is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        elif kind is bool and isinstance(value, bool):
            return True
        elif kind in (str, type(None)) and isinstance(value, kind):
            return True
    return False


def _expected(kinds: set[Any]) -> str:
    names = []
    for kind in kinds:
        if isinstance(kind, tuple):
            names.append("one of " + ", ".join(repr(v) for v in kind[1]))
        else:
            names.append(_NAMES.get(kind, kind.__name__))
    return " or ".join(sorted(set(names)))


def _target_nodes(node: Any, key: str = "") -> Iterator[tuple[str, dict]]:
    if isinstance(node, dict):
        if "_target_" in node:
            yield key, node
        for k, v in node.items():
            if not str(k).startswith("_"):
                yield from _target_nodes(v, f"{key}.{k}" if key else str(k))


def _signature(target: str) -> tuple[dict[str, inspect.Parameter], dict[str, Any], Any] | None:
    """(parameter name -> parameter, name -> type hint, the target) of a `_target_`; None if it is not found."""
    from hydra.utils import get_object

    try:
        obj = get_object(target)
    except Exception:  # noqa: BLE001 - a target that cannot be found is reported by instantiate, with its key
        return None
    # A class passes **kwargs on to its bases (e.g. VideoDataModule -> ShardDataModule): their parameters count.
    functions = [c.__init__ for c in obj.__mro__ if "__init__" in vars(c)] if inspect.isclass(obj) else [obj]
    parameters: dict[str, inspect.Parameter] = {}
    hints: dict[str, Any] = {}
    for fn in functions:
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):
            break
        try:
            fn_hints = typing.get_type_hints(fn)
        except Exception:  # noqa: BLE001 - unresolvable annotations: judge nothing of this function
            fn_hints = {}
        for name, parameter in signature.parameters.items():
            if parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL) and name not in parameters:
                parameters[name] = parameter
                if name in fn_hints:
                    hints[name] = fn_hints[name]
        if not any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values()):
            break
    return parameters, hints, obj


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigTypeError naming the first key whose value cannot work (see the module docstring)."""
    for key, types_ in TOP_LEVEL_TYPES.items():
        if key in cfg and not isinstance(OmegaConf.select(cfg, key), types_):
            value = OmegaConf.select(cfg, key)
            raise ConfigTypeError(f"{key}={value}: expected {_expected(set(types_))}")
    container = OmegaConf.to_container(cfg, resolve=False)
    problems: list[tuple[bool, str]] = []  # (the value is an interpolation, message)
    for key, node in _target_nodes(container):
        found = _signature(str(node["_target_"]))
        if found is None:
            continue
        parameters, hints, obj = found
        rate_checked = inspect.isclass(obj) and _is_rate_owner(obj)
        for name, raw in node.items():
            if str(name).startswith("_") or name not in parameters or raw == "???":
                continue
            interpolated = "${" in str(raw)
            full = f"{key}.{name}"
            value = OmegaConf.select(cfg, full, throw_on_missing=False) if interpolated else raw
            if isinstance(value, dict | list) or value == "???":
                continue
            shown = f"{full}={raw}={value}" if interpolated else f"{full}={value}"
            what = _short(node["_target_"])
            kinds = _scalar_kinds(hints.get(name, parameters[name].annotation))
            if kinds is not None and not _fits(value, kinds):
                problems.append((interpolated, f"{shown}: expected {_expected(kinds)} ({what} takes {name}: "
                                               f"{_annotation_text(hints.get(name))})"))
            elif rate_checked and name in RATE_KEYS:
                if not isinstance(value, int | float) or isinstance(value, bool):
                    problems.append((interpolated, f"{shown}: expected a number (the {name} of {what})"))
                elif value < 0:
                    problems.append((interpolated, f"{shown}: must be >= 0 (the {name} of {what})"))
    # A key the user set comes first: a value taken over by interpolation (T_max: ${trainer.max_epochs}) is
    # reported only when its source is not.
    if problems:
        raise ConfigTypeError(sorted(problems, key=lambda p: p[0])[0][1])


def _is_rate_owner(cls: type) -> bool:
    import torch

    return issubclass(cls, torch.optim.Optimizer | torch.optim.lr_scheduler.LRScheduler)


def _short(target: str) -> str:
    return str(target).rsplit(".", 1)[-1]


def _annotation_text(annotation: Any) -> str:
    if annotation is None:
        return "?"
    text = getattr(annotation, "__name__", None) if not typing.get_args(annotation) else None
    return text or str(annotation).replace("typing.", "")
