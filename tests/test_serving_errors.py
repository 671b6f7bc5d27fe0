"""Serving never loses or fails a batch for one bad record (issue 17, item 9).

Every bad value gets its own per-record error, N records in give N rows out (also through
MLflow's pyfunc and its scoring server), responses are strict JSON (null, never a bare
NaN), records missing a field the raw-log contract requires (user_id, ad_id) fail as the
Spark job quarantines them, and a request above ``serving.max_request_records`` is refused.
"""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from core.config import PipelineConfig, load_config
from serving.pyfunc import (
    DEFAULT_MAX_REQUEST_RECORDS,
    MAX_RECORDS_ENV,
    ModelBundle,
    ServingModel,
    max_request_records,
    numeric_problem,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TYPES = ["purchase", "signup"]
SCENARIOS = ["banner", "feed"]


def good_record(**changes) -> dict:
    record = {"conversion_type": "purchase", "display_scenario": "feed", "user_id": "u1", "ad_id": "a1",
              "advertiser_id": "adv1", "ad_category": "c1", "device_os": "ios", "user_age": 31,
              "bid_price": 0.4, "impression_id": "i1", "ts": "2026-11-01T10:00:00Z"}
    record.update(changes)
    return {k: v for k, v in record.items() if v is not DROP}


DROP = object()


def tiny_bundle(cfg: PipelineConfig) -> tuple[ModelBundle, torch.nn.Module]:
    """A small untrained MMN and its bundle: enough to exercise every serving path."""
    from training.models import build_model

    torch.manual_seed(0)
    model = build_model(cfg, len(TYPES), len(SCENARIOS), "mmn").eval()
    bundle = ModelBundle(config=cfg.raw, model_kind="mmn", n_types=len(TYPES), n_scenarios=len(SCENARIOS),
                         types=TYPES, scenarios=SCENARIOS)
    return bundle, model


def log_tiny_model(cfg: PipelineConfig, register: bool = False) -> str:
    """Log (and optionally register as ``champion``) a tiny model in cfg's MLflow store."""
    import mlflow
    from mlflow import MlflowClient

    from serving.pyfunc import log_serving_model

    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    mlflow.set_registry_uri(cfg.mlflow.tracking_uri)
    experiment = mlflow.set_experiment(cfg.mlflow.experiment)
    bundle, model = tiny_bundle(cfg)
    with mlflow.start_run(experiment_id=experiment.experiment_id):
        info = log_serving_model(cfg, model, bundle, pd.DataFrame([good_record()]))
    if register:
        client = MlflowClient(cfg.mlflow.tracking_uri, cfg.mlflow.tracking_uri)
        version = mlflow.register_model(info.model_uri, cfg.mlflow.registered_model)
        client.set_registered_model_alias(cfg.mlflow.registered_model, "champion", version.version)
    return info.model_uri


@pytest.fixture(scope="module")
def cfg() -> PipelineConfig:
    return load_config()


@pytest.fixture(scope="module")
def serving(cfg) -> ServingModel:
    return ServingModel(*tiny_bundle(cfg))


@pytest.fixture(scope="module")
def pyfunc_model(cfg, tmp_path_factory):
    import mlflow.pyfunc

    root = tmp_path_factory.mktemp("serving-errors")
    local = cfg.with_overrides({"mlflow.tracking_uri": f"sqlite:///{root / 'mlflow.db'}"})
    return mlflow.pyfunc.load_model(log_tiny_model(local))


def test_every_bad_value_is_a_per_record_error_and_the_rest_is_scored(serving):
    records = [
        good_record(),
        good_record(bid_price=10**400),            # OverflowError in float(): was a failed batch
        good_record(bid_price=float("inf")),
        good_record(bid_price="1.5"),             # a string where the contract wants a number
        good_record(user_age=True),
        good_record(user_id=123),                 # a number where the contract wants a string
        good_record(bid_price=float("nan")),      # missing optional numeric: scored, id 0
        good_record(advertiser_id=DROP),          # missing optional categorical: scored, id 0
    ]
    out = serving.predict_records(records)
    assert len(out) == len(records)
    errors = out["error"].tolist()
    assert errors[0] is None and errors[6] is None and errors[7] is None
    assert "'bid_price' is out of range" in errors[1] and len(errors[1]) < 200
    assert "'bid_price' must be a finite number" in errors[2]
    assert "'bid_price' must be a number" in errors[3]
    assert "'user_age' must be a number" in errors[4]
    assert "'user_id' must be a string" in errors[5]
    scored = out["error"].isna()
    assert out.loc[scored, "p_cvr"].between(0, 1).all()
    assert out.loc[~scored, ["p_ctr", "p_cvr", "p_ctcvr"]].isna().all().all()


@pytest.mark.parametrize("field", ["user_id", "ad_id"])
@pytest.mark.parametrize("value", [DROP, None, "", float("nan")])
def test_records_training_would_quarantine_are_not_scored(serving, field, value):
    """The raw-log contract requires user_id and ad_id: the Spark job quarantines an impression
    without them (missing_required_field), so serving must not score one silently."""
    out = serving.predict_records([good_record(**{field: value}), good_record()])
    assert out["error"].iloc[0] == f"missing required field {field!r}"
    assert math.isnan(out["p_cvr"].iloc[0]) and out["error"].iloc[1] is None


def test_an_error_names_every_problem_of_the_record(serving):
    out = serving.predict_records([{"conversion_type": "nope", "user_id": 5, "bid_price": "x"}])
    error = out["error"].iloc[0]
    for part in ("unknown conversion_type 'nope'", "missing required field 'display_scenario'",
                 "'user_id' must be a string", "missing required field 'ad_id'", "'bid_price' must be a number"):
        assert part in error


def test_numeric_problem():
    assert numeric_problem("x", 3) == (3.0, None)
    assert numeric_problem("x", None) == (None, None)
    assert "out of range" in numeric_problem("x", -(10**400))[1]
    assert "must be a number" in numeric_problem("x", "3")[1]


def test_pyfunc_returns_n_rows_for_n_records_even_with_no_known_field(pyfunc_model):
    """MLflow's input-schema enforcement dropped every row of a request naming none of the
    model's fields (N in, 0 out): each record now gets its own error row."""
    frame = pd.DataFrame([{"foo": 1}, {"bar": "x"}, {"foo": 2, "bar": "y"}])
    out = pyfunc_model.predict(frame)
    assert len(out) == 3
    assert out["error"].str.contains("missing required field 'conversion_type'").all()


def _invoke(model, records: list[dict]):
    from mlflow.pyfunc import scoring_server

    body = json.dumps({"dataframe_records": records})
    return scoring_server.invocations(body, "application/json", model, None)


def _strict_json(text: str):
    def refuse(constant: str):
        raise ValueError(f"not strict JSON: bare {constant}")

    return json.loads(text, parse_constant=refuse)


def test_scoring_server_answers_strict_json_with_one_row_per_record(pyfunc_model):
    records = [good_record(), good_record(bid_price=10**400), {"unknown": 1}, good_record(ad_id="")]
    response = _invoke(pyfunc_model, records)
    assert response.status == 200
    rows = _strict_json(response.response)["predictions"]
    assert len(rows) == len(records)
    assert rows[0]["error"] is None and 0 <= rows[0]["p_cvr"] <= 1
    for row in rows[1:]:
        assert row["error"] and row["p_ctr"] is None and row["p_cvr"] is None and row["p_ctcvr"] is None


def test_request_above_the_limit_is_refused_with_400(pyfunc_model, monkeypatch):
    from mlflow.exceptions import MlflowException

    monkeypatch.setattr(pyfunc_model.unwrap_python_model().serving, "max_request_records", 2)
    assert _invoke(pyfunc_model, [good_record()] * 2).status == 200
    with pytest.raises(MlflowException) as refused:
        _invoke(pyfunc_model, [good_record()] * 3)
    assert refused.value.get_http_status_code() == 400
    assert "serving.max_request_records" in refused.value.message and "limit is 2" in refused.value.message


def test_request_limit_comes_from_env_then_model_config_then_default(cfg):
    assert max_request_records(cfg.raw, environ={}) == cfg.raw["serving"]["max_request_records"]
    assert max_request_records({}, environ={}) == DEFAULT_MAX_REQUEST_RECORDS
    assert max_request_records(cfg.raw, environ={MAX_RECORDS_ENV: "7"}) == 7
    for bad in ("0", "many"):
        with pytest.raises(ValueError, match="max_request_records"):
            max_request_records(cfg.raw, environ={MAX_RECORDS_ENV: bad})
