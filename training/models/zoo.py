"""Config-driven model zoo: a model kind is registered once and built by name everywhere."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from core.config import Model, PipelineConfig, Training
from training.models.base import CVRModel

ModelFactory = Callable[[PipelineConfig, int, int], CVRModel]


@dataclass(frozen=True)
class ZooEntry:
    factory: ModelFactory
    loss_overrides: Mapping[str, Any] = field(default_factory=dict)
    training_overrides: Mapping[str, Any] = field(default_factory=dict)


MODEL_REGISTRY: dict[str, ZooEntry] = {}


def register_model(kind: str, *, loss_overrides: Mapping[str, Any] | None = None,
                   training_overrides: Mapping[str, Any] | None = None,
                   ) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator adding ``factory(cfg, n_types, n_scenarios)`` to the zoo under ``kind``.

    ``loss_overrides`` (keys of ``cfg.model``, e.g. ``dynamic_weight``) lets a kind be an
    ablation of the training objective rather than of the architecture;
    ``training_overrides`` (keys of ``cfg.training``) pins optimizer settings the same way
    (e.g. the paper's configuration whatever the pipeline's defaults are).
    """

    def add(factory: ModelFactory) -> ModelFactory:
        if kind in MODEL_REGISTRY:
            raise ValueError(f"model kind {kind!r} is already registered")
        bad = set(loss_overrides or {}) - {f.name for f in fields(Model)}
        if bad:
            raise ValueError(f"loss_overrides of {kind!r} name unknown cfg.model keys {sorted(bad)}")
        bad = set(training_overrides or {}) - {f.name for f in fields(Training)}
        if bad:
            raise ValueError(f"training_overrides of {kind!r} name unknown cfg.training keys {sorted(bad)}")
        MODEL_REGISTRY[kind] = ZooEntry(factory, dict(loss_overrides or {}),
                                        dict(training_overrides or {}))
        return factory

    return add


def available_models() -> list[str]:
    return sorted(MODEL_REGISTRY)


def check_capacity(cfg: PipelineConfig, n_types: int, n_scenarios: int) -> None:
    """Refuse domain counts beyond the configured model capacity (domains.max_*)."""
    if not 1 <= n_types <= cfg.domains.max_types:
        raise ValueError(
            f"{n_types} conversion types: need 1..domains.max_types={cfg.domains.max_types}"
        )
    if not 1 <= n_scenarios <= cfg.domains.max_scenarios:
        raise ValueError(
            f"{n_scenarios} display scenarios: need 1..domains.max_scenarios="
            f"{cfg.domains.max_scenarios}"
        )


def build_model(
    cfg: PipelineConfig, n_types: int, n_scenarios: int, kind: str | None = None
) -> CVRModel:
    """Build ``kind`` (default ``cfg.model.kind``) for ``n_types`` x ``n_scenarios`` domains."""
    kind = kind or cfg.model.kind
    if kind not in MODEL_REGISTRY:
        raise ValueError(f"unknown model kind {kind!r}; available: {available_models()}")
    check_capacity(cfg, n_types, n_scenarios)
    entry = MODEL_REGISTRY[kind]
    model = entry.factory(cfg, int(n_types), int(n_scenarios))
    model.kind = kind
    model.loss_overrides = dict(entry.loss_overrides)
    model.training_overrides = dict(entry.training_overrides)
    return model


def loss_config(cfg: PipelineConfig, model: CVRModel) -> Model:
    """``cfg.model`` with the model kind's loss overrides applied (what the trainer uses)."""
    return replace(cfg.model, **getattr(model, "loss_overrides", {}))


def training_config(cfg: PipelineConfig, model: CVRModel) -> Training:
    """``cfg.training`` with the model kind's training overrides applied."""
    return replace(cfg.training, **getattr(model, "training_overrides", {}))
