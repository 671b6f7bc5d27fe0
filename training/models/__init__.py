"""Model zoo. Adding a baseline: a module with a CVRModel subclass and a
``@register_model("<kind>")`` factory, imported below."""

from training.models import dnn, mmn  # noqa: E402,F401  (registers the kinds)
from training.models.base import CVRModel
from training.models.dnn import DNN
from training.models.mmn import MMN
from training.models.zoo import (
    MODEL_REGISTRY,
    available_models,
    build_model,
    check_capacity,
    loss_config,
    register_model,
)

__all__ = [
    "CVRModel",
    "DNN",
    "MMN",
    "MODEL_REGISTRY",
    "available_models",
    "build_model",
    "check_capacity",
    "loss_config",
    "register_model",
]
