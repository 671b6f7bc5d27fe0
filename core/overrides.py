"""Config overrides: ``section.key=value`` pairs from the environment (``MMN__SECTION__KEY``)
and command lines (``--set``), parsed as YAML and applied to the merged mapping; and the
differences between a file and an effective config (what spark-submit must be told)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from core.config import ENV_PREFIX, ConfigError


def env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name, value in env.items():
        if name.startswith(ENV_PREFIX) and name.count("__") >= 2:
            dotted = ".".join(part.lower() for part in name[len(ENV_PREFIX):].split("__"))
            found[dotted] = yaml_value(value)
    return found


def differences(base: Any, effective: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, effective value) of each leaf where ``effective`` differs from ``base``; a
    mapping whose keys changed is one leaf (an override may only replace existing keys)."""
    if base == effective:
        return []
    if isinstance(base, dict) and isinstance(effective, dict) and set(base) == set(effective):
        return [d for key in effective for d in differences(base[key], effective[key], f"{prefix}{key}.")]
    if not prefix:
        raise ConfigError("the effective config's sections differ from its source file's")
    return [(prefix[:-1], effective)]


def yaml_text(value: Any) -> str:
    """``value`` as one YAML flow text that :func:`yaml_value` reads back equal."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, allow_unicode=True)
    return text.removesuffix("\n...\n").rstrip("\n")


def yaml_value(text: str) -> Any:
    """An override's value parsed as YAML; text YAML cannot read (``@daily``, ``2026-13-01``,
    which PyYAML takes for a bad date) stays a string, for its key's check to judge."""
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError):
        return text


def parse_overrides(overrides: Sequence[str] | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(overrides, Mapping):
        return dict(overrides)
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        parsed[key.strip()] = yaml_value(value)
    return parsed


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any]) -> None:
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = data
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                raise ConfigError(f"override {dotted!r}: {part!r} is not a config section")
            node = child
        if leaf not in node:
            raise ConfigError(f"override {dotted!r}: unknown key {leaf!r}")
        node[leaf] = value
