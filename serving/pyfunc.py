"""Serve a trained model on raw impression records, with training-identical hashing.

The registered MLflow model is a pyfunc (:class:`CVRPyfunc`) that ships, inside its
artifacts, the weights plus a bundle: the effective pipeline config (feature fields and
hashing) and the domain vocabularies as they were at training time. A request record is
hashed by :mod:`core.hashing` (the pure-Python twin of the Spark job's expressions), its
domain is looked up in the shipped vocabulary, and only that domain's tower runs.

Bad records never get a silent answer: each output row carries ``error`` (null when the
record was scored; else every problem of the record, ``; ``-separated) and null
probabilities when it could not be scored. N records in give N rows out, always. The
record contract is training's: a field the raw-log contract requires (``logs.impressions.
required``) that is missing or empty fails the record, as the Spark job quarantines it
(``missing_required_field``); a value of the wrong JSON type fails it (``wrong_type``);
numbers must be finite. A request holds at most ``serving.max_request_records`` records.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
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
from core.threads import apply_torch_threads, policy_for

OUTPUT_COLUMNS = ["p_ctr", "p_cvr", "p_ctcvr", "error"]
PROBABILITY_COLUMNS = ["p_ctr", "p_cvr", "p_ctcvr"]
BUNDLE_FORMAT = 1
# Used when neither the environment nor the model's config names a limit (a bundle written
# before the serving section existed).
DEFAULT_MAX_REQUEST_RECORDS = 50_000
MAX_RECORDS_ENV = "MMN__SERVING__MAX_REQUEST_RECORDS"
# MMN's composed-tower cache budget when neither the environment nor the model's config
# names one (core.config.Serving's default; docs/benchmarks.md measures the choice).
DEFAULT_TOWER_CACHE_MB = 64
TOWER_CACHE_ENV = "MMN__SERVING__TOWER_CACHE_MB"


class RecordError(ValueError):
    """One request record cannot be scored; the message says why."""


class RequestTooLarge(ValueError):
    """A request holds more records than ``serving.max_request_records``."""


def _short(value: Any, limit: int = 40) -> str:
    """repr of a bad value, cut short: an error message must not echo a megabyte back."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's str-conversion digit limit
        return f"<{type(value).__name__} too large to print>"
    return text if len(text) <= limit else text[:limit] + "..."


def numeric_problem(name: str, value: Any) -> tuple[float | None, str | None]:
    """(the value as a float, None) for a usable number or a missing one (None, None);
    (None, why) for a value training could not have seen as a number."""
    if is_missing(value):
        return None, None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return None, f"field {name!r} must be a number, got {type(value).__name__} {_short(value)}"
    try:
        number = float(value)
    except OverflowError:
        return None, f"field {name!r} is out of range: {_short(value)}"
    if not math.isfinite(number):
        return None, f"field {name!r} must be a finite number, got {_short(value)}"
    return number, None


def max_request_records(config: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> int:
    """The request size limit: $MMN__SERVING__MAX_REQUEST_RECORDS (set by `mmn serve` from the
    effective config), else the model's own config, else the built-in default."""
    env = os.environ if environ is None else environ
    raw = env.get(MAX_RECORDS_ENV)
    if raw is None:
        raw = (config.get("serving") or {}).get("max_request_records", DEFAULT_MAX_REQUEST_RECORDS)
    try:
        limit = int(raw)
    except (TypeError, ValueError):
        raise ValueError(f"serving.max_request_records must be a positive integer, got {raw!r}") from None
    if limit < 1:
        raise ValueError(f"serving.max_request_records must be a positive integer, got {raw!r}")
    return limit


def tower_cache_bytes(config: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> int:
    """MMN's composed-tower cache budget in bytes: $MMN__SERVING__TOWER_CACHE_MB (set by
    `mmn serve` from the effective config), else the model's own config, else the default."""
    env = os.environ if environ is None else environ
    raw = env.get(TOWER_CACHE_ENV)
    if raw is None:
        raw = (config.get("serving") or {}).get("tower_cache_mb", DEFAULT_TOWER_CACHE_MB)
    try:
        megabytes = int(raw)
    except (TypeError, ValueError):
        raise ValueError(f"serving.tower_cache_mb must be an integer >= 0, got {raw!r}") from None
    if megabytes < 0:
        raise ValueError(f"serving.tower_cache_mb must be an integer >= 0, got {raw!r}")
    return megabytes * 2**20


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
        # Feature fields the raw-log contract requires (user_id, ad_id): training quarantines
        # an impression without them, so serving refuses to score one.
        required = self.cfg.logs["impressions"].required
        self.required_features = {f.name for f in self.cfg.features if f.name in required}
        self.max_request_records = max_request_records(bundle.config)
        if hasattr(self.model, "set_predict_cache_budget"):  # MMN: its composed-tower cache
            self.model.set_predict_cache_budget(tower_cache_bytes(bundle.config))

    @classmethod
    def load(cls, bundle_path: Path, weights_path: Path) -> ServingModel:
        from training.models import build_model

        bundle = ModelBundle.from_json(Path(bundle_path).read_text())
        cfg = config_from_mapping(bundle.config)
        # The thread policy of the model's config (runtime.*; a bundle older than the section
        # takes its defaults): intra-op threads from the usable CPUs, inter-op 1 (core.threads).
        apply_torch_threads(policy_for(cfg))
        model = build_model(cfg, bundle.n_types, bundle.n_scenarios, kind=bundle.model_kind)
        model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
        return cls(bundle, model)

    def encode(self, record: Mapping[str, Any]) -> tuple[list[int], int, int]:
        """Hash one raw record exactly as the Spark job does; RecordError naming every
        problem of the record when it can't be scored."""
        domains = self.cfg.domains
        problems: list[str] = []
        type_id = self._domain_id(record, domains.type_field, self.type_ids, problems)
        scenario_id = self._domain_id(record, domains.scenario_field, self.scenario_ids, problems)
        ids = []
        for field in self.cfg.features:
            value = record.get(field.name)
            if is_missing(value):
                if field.name in self.required_features:
                    problems.append(f"missing required field {field.name!r}")
                value = None
            elif field.kind == "categorical":
                if not isinstance(value, str):
                    problems.append(f"field {field.name!r} must be a string, got {_short(value)}")
                    continue
            else:
                value, why = numeric_problem(field.name, value)
                if why:
                    problems.append(why)
                    continue
            ids.append(feature_id(field, value, self.cfg.hashing.seed))
        if problems:
            raise RecordError("; ".join(problems))
        return ids, type_id, scenario_id

    @staticmethod
    def _domain_id(record: Mapping[str, Any], name: str, ids: Mapping[str, int], problems: list[str]) -> int:
        value = record.get(name)
        if is_missing(value):
            problems.append(f"missing required field {name!r}")
        elif not isinstance(value, str):
            problems.append(f"field {name!r} must be a string, got {_short(value)}")
        elif value not in ids:
            problems.append(f"unknown {name} {_short(value)}: not in the model's vocabulary")
        else:
            return ids[value]
        return -1

    def score(self, records: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        """(p_ctr, p_cvr, errors) of raw records; the rows of each domain run its tower only."""
        n = len(records)
        p_ctr = np.full(n, np.nan)
        p_cvr = np.full(n, np.nan)
        errors: list[str | None] = [None] * n
        groups: dict[tuple[int, int], tuple[list[int], list[list[int]]]] = {}
        for row, record in enumerate(records):
            try:
                ids, type_id, scenario_id = self.encode(record)
            except RecordError as exc:
                errors[row] = str(exc)
                continue
            group = groups.get((type_id, scenario_id))
            if group is None:
                groups[(type_id, scenario_id)] = ([row], [ids])
            else:
                group[0].append(row)
                group[1].append(ids)
        for (type_id, scenario_id), (rows, features) in groups.items():
            # Lists, not a tensor: the models' predict path checks and offsets a small
            # request's ids in Python (training.models.predict_path).
            ctr, cvr = self.model.predict_domain(features, type_id, scenario_id)
            p_ctr[rows] = ctr.numpy()
            p_cvr[rows] = cvr.numpy()
        return p_ctr, p_cvr, errors

    def predict_records(self, records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
        """Score raw records: p_ctr, p_cvr, p_ctcvr (NaN where a record can't be scored), error."""
        p_ctr, p_cvr, errors = self.score(list(records))
        return pd.DataFrame({"p_ctr": p_ctr, "p_cvr": p_cvr, "p_ctcvr": p_ctr * p_cvr,
                             "error": pd.Series(errors, dtype=object)})

    def predict_json_records(self, records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
        """``strict_json_frame(predict_records(records))``, built in one step: the pyfunc's
        answer (object columns; None, never NaN, where a probability is undefined)."""
        p_ctr, p_cvr, errors = self.score(records)
        out = np.empty((len(errors), len(OUTPUT_COLUMNS)), dtype=object)
        for column, values in enumerate((p_ctr, p_cvr, p_ctr * p_cvr)):
            out[:, column] = [None if v != v else v for v in values.tolist()]
        out[:, len(PROBABILITY_COLUMNS)] = errors
        return pd.DataFrame(out, columns=OUTPUT_COLUMNS, dtype=object)  # no str inference


def strict_json_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The predictions with null (None) where a probability is undefined: MLflow's JSON
    encoder writes a float NaN as a bare ``NaN``, which strict JSON parsers reject."""
    out = frame.copy()
    for column in PROBABILITY_COLUMNS:
        values = out[column].to_numpy(dtype=float)
        out[column] = pd.Series([None if math.isnan(v) else float(v) for v in values],
                                index=out.index, dtype=object)
    return out


def _records_from(model_input: Any) -> list[dict[str, Any]]:
    if isinstance(model_input, pd.DataFrame):
        # Each column's array .tolist() gives native Python values (ints, floats, bools, str,
        # Timestamps), as to_dict does, at a fifth of to_dict's cost on a one-record frame
        # (a frame-wide to_numpy(object) is half as fast again: pandas' str columns are one
        # block each); NaN stays NaN (encode treats it as missing), pandas' own missing
        # markers become None.
        columns = [str(c) for c in model_input.columns]
        column_array = getattr(model_input, "_get_column_array", None)
        if not columns:
            rows: Iterable[Sequence[Any]] = [() for _ in range(len(model_input))]
        elif column_array is None:  # a pandas without it
            rows = model_input.to_numpy(dtype=object).tolist()
        else:
            rows = zip(*(column_array(i).tolist() for i in range(len(columns))), strict=True)
        return [{k: (None if v is pd.NA or v is pd.NaT else v) for k, v in zip(columns, row, strict=True)}
                for row in rows]
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

        # model_input carries no type hint: MLflow would otherwise wrap predict in its type-hint
        # validation and warn that ``Any`` is not a list type (its own advice: remove the hint).
        def predict(self, context, model_input, params=None):
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

            records = _records_from(model_input)
            limit = self.serving.max_request_records
            if len(records) > limit:  # HTTP 400 with this message from the scoring server
                raise MlflowException(
                    f"request holds {len(records)} records; the limit is {limit} "
                    "(serving.max_request_records): split it into smaller requests",
                    error_code=INVALID_PARAMETER_VALUE)
            return self.serving.predict_json_records(records)

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
    from mlflow.models import ModelSignature, infer_signature

    # Outputs only, no input schema: MLflow's enforcement of one would fail a whole request on
    # one badly typed value (even a JSON int in a double column) and turn a request naming none
    # of the schema's fields into an empty frame (N records in, 0 rows out). predict_records
    # checks every record against training's contract instead; the input example shows the
    # fields (input_columns).
    serving = ServingModel(bundle, model)
    outputs = infer_signature(input_example, serving.predict_records(_records_from(input_example))).outputs
    signature = ModelSignature(inputs=None, outputs=outputs)
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
