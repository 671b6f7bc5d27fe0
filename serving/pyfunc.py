"""Serve a trained model on raw impression records, with training-identical hashing.

The registered MLflow model is a pyfunc (:class:`CVRPyfunc`) that ships, inside its
artifacts, the weights plus a bundle: the effective pipeline config (feature fields and
hashing) and the domain vocabularies as they were at training time. A request record is
hashed by :mod:`core.hashing` (the pure-Python twin of the Spark job's expressions), its
domain is looked up in the shipped vocabulary, and only that domain's tower runs.

Bad records never get a silent answer: each output row carries ``error`` (null when the
record was scored) and NaN probabilities when it could not be scored.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from core.config import REPO_ROOT, PipelineConfig, config_from_mapping
from core.contracts import request_fields
from core.hashing import feature_id, is_missing

OUTPUT_COLUMNS = ["p_ctr", "p_cvr", "p_ctcvr", "error"]
BUNDLE_FORMAT = 1


class RecordError(ValueError):
    """One request record cannot be scored; the message says why."""


@dataclass
class ModelBundle:
    """Everything besides the weights that a model needs to score raw records."""

    config: dict[str, Any]
    model_kind: str
    n_types: int
    n_scenarios: int
    types: list[str]
    scenarios: list[str]

    def to_json(self) -> str:
        return json.dumps({"format": BUNDLE_FORMAT, **self.__dict__}, indent=1, default=str)

    @classmethod
    def from_json(cls, text: str) -> ModelBundle:
        data = json.loads(text)
        if data.pop("format", None) != BUNDLE_FORMAT:
            raise ValueError("unsupported model bundle format")
        return cls(**data)


class ServingModel:
    """A trained torch model plus the hashing and vocabularies it was trained with."""

    def __init__(self, bundle: ModelBundle, model: torch.nn.Module) -> None:
        self.bundle = bundle
        self.cfg: PipelineConfig = config_from_mapping(bundle.config)
        self.model = model.eval()
        self.type_ids = {v: i for i, v in enumerate(bundle.types)}
        self.scenario_ids = {v: i for i, v in enumerate(bundle.scenarios)}

    @classmethod
    def load(cls, bundle_path: Path, weights_path: Path) -> ServingModel:
        from training.models import build_model

        bundle = ModelBundle.from_json(Path(bundle_path).read_text())
        cfg = config_from_mapping(bundle.config)
        model = build_model(cfg, bundle.n_types, bundle.n_scenarios, kind=bundle.model_kind)
        model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
        return cls(bundle, model)

    def encode(self, record: Mapping[str, Any]) -> tuple[list[int], int, int]:
        """Hash one raw record exactly as the Spark job does; RecordError when it can't."""
        domains = self.cfg.domains
        type_id = self._domain_id(record, domains.type_field, self.type_ids)
        scenario_id = self._domain_id(record, domains.scenario_field, self.scenario_ids)
        ids = []
        for field in self.cfg.features:
            value = record.get(field.name)
            if field.kind == "categorical" and not is_missing(value) and not isinstance(value, str):
                raise RecordError(f"field {field.name!r} must be a string, got {value!r}")
            try:
                ids.append(feature_id(field, value, self.cfg.hashing.seed))
            except TypeError as exc:
                raise RecordError(str(exc)) from None
        return ids, type_id, scenario_id

    @staticmethod
    def _domain_id(record: Mapping[str, Any], name: str, ids: Mapping[str, int]) -> int:
        value = record.get(name)
        if is_missing(value):
            raise RecordError(f"missing required field {name!r}")
        if not isinstance(value, str):
            raise RecordError(f"field {name!r} must be a string, got {value!r}")
        if value not in ids:
            raise RecordError(f"unknown {name} {value!r}: not in the model's vocabulary")
        return ids[value]

    @torch.no_grad()
    def predict_records(self, records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
        """Score raw records; requests are grouped so each domain runs only its own tower."""
        records = list(records)
        p_ctr = np.full(len(records), np.nan)
        p_cvr = np.full(len(records), np.nan)
        errors: list[str | None] = [None] * len(records)
        groups: dict[tuple[int, int], list[tuple[int, list[int]]]] = {}
        for row, record in enumerate(records):
            try:
                ids, type_id, scenario_id = self.encode(record)
            except RecordError as exc:
                errors[row] = str(exc)
                continue
            groups.setdefault((type_id, scenario_id), []).append((row, ids))
        for (type_id, scenario_id), members in groups.items():
            rows = [r for r, _ in members]
            features = torch.tensor([ids for _, ids in members], dtype=torch.long)
            ctr, cvr = self.model.predict_domain(features, type_id, scenario_id)
            p_ctr[rows] = ctr.numpy()
            p_cvr[rows] = cvr.numpy()
        return pd.DataFrame({"p_ctr": p_ctr, "p_cvr": p_cvr, "p_ctcvr": p_ctr * p_cvr,
                             "error": pd.Series(errors, dtype=object)})


def _records_from(model_input: Any) -> list[dict[str, Any]]:
    if isinstance(model_input, pd.DataFrame):
        # to_dict gives native Python values; NaN stays NaN (encode treats it as missing),
        # pandas' own missing markers become None. Cheaper than a frame-wide astype/where,
        # which cost most of a one-record request.
        return [{k: (None if v is pd.NA or v is pd.NaT else v) for k, v in row.items()}
                for row in model_input.to_dict(orient="records")]
    if isinstance(model_input, Mapping):
        return [dict(model_input)]
    return [dict(r) for r in model_input]


try:  # mlflow is a training-time dependency; keep this module importable without it.
    import mlflow.pyfunc

    class CVRPyfunc(mlflow.pyfunc.PythonModel):
        """MLflow pyfunc: raw impression records in, p_ctr / p_cvr / p_ctcvr / error out."""

        def load_context(self, context: Any) -> None:
            self.serving = ServingModel.load(
                Path(context.artifacts["bundle"]), Path(context.artifacts["weights"])
            )

        def predict(self, context: Any, model_input: Any, params: dict | None = None) -> pd.DataFrame:
            return self.serving.predict_records(_records_from(model_input))

except ImportError:  # pragma: no cover - serving without mlflow installed
    CVRPyfunc = None  # type: ignore[assignment,misc]


def input_columns(cfg: PipelineConfig) -> list[str]:
    """Raw-record fields the model reads (all optional: a missing one is a per-record error)."""
    return request_fields(cfg)


def _pip_requirements() -> list[str]:
    names = ["torch", "mlflow", "pandas", "numpy", "xxhash", "pyyaml"]
    return [f"{name}=={metadata.version(name)}" for name in names]


def log_serving_model(
    cfg: PipelineConfig,
    model: torch.nn.Module,
    bundle: ModelBundle,
    input_example: pd.DataFrame,
    name: str = "model",
) -> Any:
    """Log the pyfunc (weights, bundle, code, signature, input example) to the active run."""
    from mlflow.models import infer_signature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    # AnyType: MLflow's own enforcement would fail a whole request on one badly typed value
    # (even a JSON int in a double column); predict_records checks types per record instead.
    inputs = Schema([ColSpec(AnyType(), name, required=False) for name in input_columns(cfg)])
    serving = ServingModel(bundle, model)
    outputs = infer_signature(input_example, serving.predict_records(_records_from(input_example)))
    signature = type(outputs)(inputs=inputs, outputs=outputs.outputs)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.pt"
        bundle_path = Path(tmp) / "bundle.json"
        torch.save(model.state_dict(), weights)
        bundle_path.write_text(bundle.to_json())
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=CVRPyfunc(),
            artifacts={"weights": str(weights), "bundle": str(bundle_path)},
            code_paths=[str(REPO_ROOT / "mmn"), str(REPO_ROOT / "training")],
            signature=signature,
            input_example=input_example,
            pip_requirements=_pip_requirements(),
        )


def load_serving_model(model_uri: str) -> ServingModel:
    """Load a logged or registered model (``runs:/…``, ``models:/name@champion``) in-process."""
    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().serving
