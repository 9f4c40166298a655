"""Components configured from YAML as ``{class_path, init_args}`` (record kinds, objectives) and saved in that
same form in checkpoints' hyper-parameters, so a checkpoint rebuilds them without its config."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T", bound="Component")


class Component:
    """A configurable part; subclasses implement :meth:`init_args`."""

    def init_args(self) -> dict[str, Any]:
        """The constructor arguments, plain values only (saved in checkpoints' hyper-parameters)."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """``{"class_path", "init_args"}``: the YAML form, which :func:`build_component` reads back."""
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": self.init_args()}


def plain(value: Any) -> Any:
    """A hyper-parameter as plain values: a component as its spec, a config dataclass as a dict. Checkpoints then
    hold only builtins, which ``torch.load(weights_only=True)`` (Lightning's resume) accepts."""
    if isinstance(value, Component):
        return value.spec()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def build_component(value: T | Mapping[str, Any], base: type[T], setting: str, choices: str) -> T:
    """A ``base`` instance from an instance or its :meth:`Component.spec` (YAML / saved hyper-parameters).
    Only subclasses of ``base`` are built; nothing else is imported or evaluated. ``setting`` names the config
    key and ``choices`` the shipped classes in error messages."""
    if isinstance(value, base):
        return value
    if not isinstance(value, Mapping) or "class_path" not in value:
        raise TypeError(f"{setting} must be a {base.__name__} ({{class_path, init_args}}), got {value!r}")
    module, _, name = str(value["class_path"]).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"{setting}.class_path={value['class_path']!r} is not importable ({e}); use "
                         f"{choices}") from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"{setting}.class_path={value['class_path']!r} is not a {base.__name__}; use {choices}")
    return cls(**dict(value.get("init_args") or {}))
