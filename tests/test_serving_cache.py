"""MMN's composed-tower cache bounded by bytes, and the serving fast path (issue 19, item 3).

The cache keeps the least-recently-used order and never holds more bytes than its budget;
predictions are the same with cache hits, misses, no cache at all and through the fast path
as through ``forward``; ``serving.tower_cache_mb`` is a checked config key that reaches the
served model.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from core.config import ConfigError, config_from_mapping, load_config
from serving.pyfunc import (
    DEFAULT_TOWER_CACHE_MB,
    TOWER_CACHE_ENV,
    ModelBundle,
    ServingModel,
    strict_json_frame,
    tower_cache_bytes,
)
from training.models import build_model
from training.models.mmn import MMN, _nbytes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_TYPES, N_SCENARIOS = 3, 4


@pytest.fixture(scope="module")
def cfg():
    return load_config()


def _model(cfg, kind: str = "mmn", wide: bool | None = None, seed: int = 0):
    torch.manual_seed(seed)
    if wide is None:
        model = build_model(cfg, N_TYPES, N_SCENARIOS, kind)
    else:
        model = MMN.from_config(cfg, N_TYPES, N_SCENARIOS, wide=wide)
    with torch.no_grad():  # domain deltas and the wide term start at zero: make them count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _features(cfg, n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, f.cardinality, (n,), generator=g) for f in cfg.features], 1)


def _tower_bytes(model: MMN) -> int:
    return _nbytes(model._cached_tower(0, 0)) if model._predict_cache else _nbytes(
        [(w.t(), b) for w, b in model.cvr_tower.composed(0, 0)])


def test_the_cache_never_exceeds_its_budget_and_evicts_least_recently_used(cfg):
    model = _model(cfg)
    one = _tower_bytes(model)
    model.set_predict_cache_budget(3 * one + one // 2)  # room for 3 towers, not 4
    feats = _features(cfg, 2)
    for t, s in [(0, 0), (0, 1), (0, 2)]:
        model.predict_domain(feats, t, s)
        assert model.predict_cache_nbytes <= model.predict_cache_bytes
    assert list(model._predict_cache) == [(0, 0), (0, 1), (0, 2)]
    model.predict_domain(feats, 0, 0)  # a hit: (0, 0) becomes the most recently used
    model.predict_domain(feats, 1, 1)  # a miss: evicts (0, 1), the least recently used
    assert list(model._predict_cache) == [(0, 2), (0, 0), (1, 1)]
    assert model.predict_cache_nbytes == 3 * one <= model.predict_cache_bytes
    assert (model.predict_cache_hits, model.predict_cache_misses) == (1, 4)
    model.set_predict_cache_budget(one)  # shrinking evicts down to the budget at once
    assert list(model._predict_cache) == [(1, 1)] and model.predict_cache_nbytes == one
    model.set_predict_cache_budget(one - 1)  # a tower larger than the budget is never kept
    model.predict_domain(feats, 2, 3)
    assert not model._predict_cache and model.predict_cache_nbytes == 0


@pytest.mark.parametrize("wide", [True, False])
def test_hits_misses_no_cache_and_the_fast_path_give_forwards_values(cfg, wide):
    model = _model(cfg, wide=wide)
    feats = _features(cfg, 40)
    domains = [(t, s) for t in range(N_TYPES) for s in range(N_SCENARIOS)]
    with torch.no_grad():
        expected = {d: model(feats, torch.full((40,), d[0]), torch.full((40,), d[1])) for d in domains}
    one = _tower_bytes(model)
    for budget in (None, 0, 2 * one):  # everything cached, nothing cached, thrashing LRU
        model.set_predict_cache_budget(budget)
        model.clear_predict_cache()
        for _ in range(2):  # the first pass misses, the second hits (where anything is kept)
            for t, s in domains:
                ctr, cvr = expected[(t, s)]
                # one row and 3 rows (the Python fast path), 40 rows (the tensor path), and the
                # serving layer's form: a list of id lists
                for rows in (slice(0, 1), slice(5, 8), slice(0, 40)):
                    got_ctr, got_cvr = model.predict_domain(feats[rows], t, s)
                    torch.testing.assert_close(got_ctr, ctr[rows], atol=1e-6, rtol=1e-5)
                    torch.testing.assert_close(got_cvr, cvr[rows], atol=1e-6, rtol=1e-5)
                got_ctr, got_cvr = model.predict_domain(feats[5:8].tolist(), t, s)
                torch.testing.assert_close(got_cvr, cvr[5:8], atol=1e-6, rtol=1e-5)
                assert model.predict_cache_nbytes <= (budget if budget is not None else 1 << 62)
    assert model.predict_cache_hits > 0 and model.predict_cache_misses > 0


def test_wide_fields_subset_through_the_fast_path(cfg):
    sub = cfg.with_overrides({"model.wide_fields": ["ad_id", "device_os", "bid_price"]})
    model = _model(sub)
    feats = _features(cfg, 3)
    with torch.no_grad():
        _, cvr = model(feats, torch.full((3,), 2), torch.full((3,), 1))
    torch.testing.assert_close(model.predict_domain(feats.tolist(), 2, 1)[1], cvr, atol=1e-6, rtol=1e-5)


def test_the_dnn_fast_path_equals_forward_and_both_check_ids(cfg):
    model = _model(cfg, "dnn")
    feats = _features(cfg, 20)
    with torch.no_grad():
        ctr, cvr = model(feats, torch.full((20,), 1), torch.full((20,), 3))
    for rows in (slice(0, 1), slice(0, 20)):
        got_ctr, got_cvr = model.predict_domain(feats[rows], 1, 3)
        torch.testing.assert_close(got_ctr, ctr[rows], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got_cvr, cvr[rows], atol=1e-6, rtol=1e-5)
    for kind in ("dnn", "mmn"):
        m = _model(cfg, kind)
        bad = feats[:2].clone()
        bad[1, 0] = cfg.features[0].cardinality  # one past the field's range
        for request in (bad, bad.tolist(), torch.cat([bad] * 20)):
            with pytest.raises(ValueError, match="outside"):
                m.predict_domain(request, 0, 0)
        with pytest.raises(ValueError, match="scenario_id"):
            m.predict_domain(feats[:1], 0, N_SCENARIOS)


def test_a_weight_update_reaches_the_cached_towers_and_the_wide_copy(cfg):
    model = _model(cfg)
    feats = _features(cfg, 2)
    model.predict_domain(feats, 1, 2)
    with torch.no_grad():  # in place, without train() / load_state_dict(): version counters
        model.wide.by_type.weight.add_(0.5)
        model.cvr_tower.weight_scenario[0].add_(0.1)
        _, expected = model(feats, torch.full((2,), 1), torch.full((2,), 2))
    torch.testing.assert_close(model.predict_domain(feats, 1, 2)[1], expected, atol=1e-6, rtol=1e-5)


def test_serving_model_applies_the_budget_and_answers_as_before(cfg, monkeypatch):
    types, scenarios = [f"t{i}" for i in range(N_TYPES)], [f"s{i}" for i in range(N_SCENARIOS)]
    bundle = ModelBundle(config=cfg.with_overrides({"serving.tower_cache_mb": 3}).raw, model_kind="mmn",
                         n_types=N_TYPES, n_scenarios=N_SCENARIOS, types=types, scenarios=scenarios)
    monkeypatch.delenv(TOWER_CACHE_ENV, raising=False)
    serving = ServingModel(bundle, _model(cfg))
    assert serving.model.predict_cache_bytes == 3 * 2**20
    records = [{"conversion_type": types[i % N_TYPES], "display_scenario": scenarios[i % N_SCENARIOS],
                "user_id": f"u{i}", "ad_id": f"a{i}", "bid_price": 0.1 * i} for i in range(12)]
    records.append({"conversion_type": "nope", "user_id": "u", "ad_id": "a"})
    frame = serving.predict_records(records)
    strict = serving.predict_json_records(records)
    pd.testing.assert_frame_equal(strict, strict_json_frame(frame))
    assert strict["error"].iloc[-1] and strict["p_cvr"].iloc[-1] is None
    # one record at a time (the Python fast path) equals the batch (grouped rows)
    singles = pd.concat([serving.predict_records([r]) for r in records], ignore_index=True)
    pd.testing.assert_frame_equal(singles, frame, atol=1e-6, rtol=1e-5)
    monkeypatch.setenv(TOWER_CACHE_ENV, "0")
    assert ServingModel(bundle, _model(cfg)).model.predict_cache_bytes == 0


def test_tower_cache_budget_comes_from_env_then_model_config_then_default(cfg):
    assert tower_cache_bytes(cfg.raw, environ={}) == cfg.serving.tower_cache_mb * 2**20
    assert tower_cache_bytes({}, environ={}) == DEFAULT_TOWER_CACHE_MB * 2**20
    assert tower_cache_bytes(cfg.raw, environ={TOWER_CACHE_ENV: "0"}) == 0
    for bad in ("-1", "lots"):
        with pytest.raises(ValueError, match="tower_cache_mb"):
            tower_cache_bytes(cfg.raw, environ={TOWER_CACHE_ENV: bad})


def test_tower_cache_mb_is_a_checked_serving_key(cfg):
    assert cfg.serving.tower_cache_mb == cfg.raw["serving"]["tower_cache_mb"]
    assert DEFAULT_TOWER_CACHE_MB == type(cfg.serving)().tower_cache_mb  # one default
    without = {k: v for k, v in cfg.raw.items() if k != "serving"}
    assert config_from_mapping(without).serving.tower_cache_mb == DEFAULT_TOWER_CACHE_MB
    assert load_config(environ={}, overrides=["serving.tower_cache_mb=0"]).serving.tower_cache_mb == 0
    with pytest.raises(ConfigError, match="serving.tower_cache_mb: must be >= 0"):
        load_config(environ={}, overrides=["serving.tower_cache_mb=-1"])
    with pytest.raises(ConfigError, match="serving.tower_cache_mb: expected an integer"):
        load_config(environ={}, overrides=["serving.tower_cache_mb=big"])


def test_request_frames_read_as_to_dict_reads_them():
    import numpy as np

    from serving.pyfunc import _records_from

    frame = pd.DataFrame({"a": ["x", None], "b": [1, 2], "c": [1.5, np.nan], "e": [True, False],
                          "d": pd.array([1, None], dtype="Int64"), "f": pd.to_datetime(["2026-01-01", None])})
    got = _records_from(frame)
    want = [{k: (None if v is pd.NA or v is pd.NaT else v) for k, v in row.items()}
            for row in frame.to_dict(orient="records")]
    assert [{k: type(v) for k, v in r.items()} for r in got] == [{k: type(v) for k, v in r.items()} for r in want]
    assert str(got) == str(want)
    assert _records_from(pd.DataFrame(index=range(3))) == [{}, {}, {}]  # N rows in, N records out
