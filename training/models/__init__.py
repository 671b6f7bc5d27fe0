"""Model zoo. Adding a baseline: a module with a CVRModel subclass and a
``@register_model("<kind>")`` factory, imported below."""

# Importing a model module registers its kinds.
from training.models import dnn, dpg, mmn, mmoe, mtfwfm, ple, star  # noqa: E402,F401
from training.models.base import CVRModel
from training.models.dnn import DNN
from training.models.dpg import DPG, MIDPG
from training.models.mmn import MMN
from training.models.mmoe import MMoE
from training.models.mtfwfm import MTFwFM
from training.models.ple import PLE
from training.models.star import STAR
from training.models.zoo import (
    MODEL_REGISTRY,
    available_models,
    build_model,
    check_capacity,
    loss_config,
    register_model,
    training_config,
)

__all__ = [
    "CVRModel",
    "DNN",
    "DPG",
    "MIDPG",
    "MMN",
    "MMoE",
    "MODEL_REGISTRY",
    "MTFwFM",
    "PLE",
    "STAR",
    "available_models",
    "build_model",
    "check_capacity",
    "loss_config",
    "register_model",
    "training_config",
]
