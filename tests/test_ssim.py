"""SSIM: the STE gate, the mask term, the selection's response to epsilon / lambda, saved sets,
exact equivalence without sharing, the reuse loss, and search + reuse end to end."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch

from core.config import ConfigError, Ssim, config_from_mapping, load_config
from simulation.synthetic import make_day, write_day, write_days, write_vocabs
from training import ssim as S
from training.data import BucketRange, SampleStream, batch_to_device
from training.distributed import DistInfo
from training.hooks import StepLoss
from training.losses import bce, domain_weights, loss_from_config
from training.models import build_model, loss_config
from training.options import TrainOptions
from training.trainer import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DAYS = ["2024-03-01", "2024-03-02"]
N_TYPES, N_SCENARIOS = 2, 3
SMALL_FEATURES = [
    {"name": "user_id", "kind": "categorical", "buckets": 500},
    {"name": "ad_id", "kind": "categorical", "buckets": 200},
    {"name": "ad_category", "kind": "categorical", "buckets": 30},
    {"name": "user_age", "kind": "numeric", "boundaries": [18, 25, 35, 45, 55, 65]},
]
# Enough epochs for the gates to settle on 1500-row days (production runs ~1 epoch of many steps).
SEARCH = Ssim(epochs=5)
SHARED_SEARCH = Ssim(epochs=2)  # the module's saved set


def _cfg(root, **overrides):
    base = {
        "paths.lake_root": str(root / "lake"), "paths.truth_root": str(root / "truth"),
        "paths.reports_root": str(root / "reports"),
        "model.embedding_dim": 4, "model.ctr_hidden": [16], "model.cvr_hidden": [16],
        "training.batch_size": 128, "training.shuffle_buffer": 1000, "training.read_batch_rows": 500,
        "training.eval_every_steps": 20, "training.validation_fraction": 0.1,
        "training.early_stopping_patience": 100, "features": SMALL_FEATURES,
    }
    return load_config(overrides={**base, **overrides})


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    cfg = _cfg(tmp_path_factory.mktemp("ssim"))
    write_days(cfg, DAYS, 1500, N_TYPES, N_SCENARIOS, seed=1)
    return cfg


@pytest.fixture(scope="module")
def shared(cfg):
    return S.search(cfg, DAYS, ssim=SHARED_SEARCH)


def _ratio(cfg, **ssim) -> float:
    return S.search(cfg, DAYS, ssim=dataclasses.replace(SEARCH, **ssim)).manifest["selection_ratio"]


# ----------------------------------------------------------------------------- gate and mask


def test_ste_gate_is_hard_forward_and_passes_gradients_back():
    logits = torch.tensor([-2.0, -0.1, 0.1, 0.5, 3.0], requires_grad=True)
    gate = S.ste_gate(logits, epsilon=0.5)
    assert gate.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]  # exactly 0/1: sigmoid > 0.5 iff z > 0
    upstream = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    (gate * upstream).sum().backward()
    sig = torch.sigmoid(logits.detach())
    expected = upstream * sig * (1 - sig) * (sig > 0.5)  # straight through ReLU(sigmoid - eps)
    assert torch.allclose(logits.grad, expected)
    assert (logits.grad[2:] > 0).all() and (logits.grad[:2] == 0).all()


def test_mask_term_is_kl_from_the_target_share():
    z = torch.linspace(-4, 4, 9)
    assert torch.allclose(S.mask_kl(z, 1.0), -torch.nn.functional.logsigmoid(z))  # KL(1 || G)
    rho, p = 0.3, torch.sigmoid(z)
    manual = rho * math.log(rho) - rho * torch.log(p) + (1 - rho) * math.log(1 - rho) \
        - (1 - rho) * torch.log(1 - p)
    assert torch.allclose(S.mask_kl(z, rho), manual, atol=1e-6)
    assert float(S.mask_kl(torch.logit(torch.tensor(rho)), rho)) == pytest.approx(0.0, abs=1e-6)


def test_targets_are_the_other_scenarios_of_the_type_or_any_other_domain():
    t, s = torch.tensor([0, 1]), torch.tensor([2, 0])
    within = S.Targets(N_TYPES, N_SCENARIOS, across_types=False)
    tt, ss = within.domains(t)
    assert within.n_heads == N_SCENARIOS and tt.tolist() == [[0, 0, 0], [1, 1, 1]]
    assert ss.tolist() == [[0, 1, 2], [0, 1, 2]]
    assert within.eligible(t, s).tolist() == [[True, True, False], [False, True, True]]
    across = S.Targets(N_TYPES, N_SCENARIOS, across_types=True)
    assert across.n_heads == 6 and across.eligible(t, s).sum(1).tolist() == [5, 5]
    assert not across.eligible(t, s)[0, 2] and not across.eligible(t, s)[1, 3]


def test_config_section_is_typed_with_one_set_of_defaults(cfg):
    """cfg.ssim is parsed and checked at load; the YAML's values equal the dataclass's (the
    defaults a bundle older than the section takes), so there is one set of defaults."""
    assert cfg.ssim == Ssim()
    with_section = config_from_mapping({**cfg.raw, "ssim": {"epsilon": 0.3, "ratio_grid": [0, 0.5]}})
    got = with_section.ssim
    assert got.epsilon == 0.3 and got.ratio_grid == (0, 0.5) and got.mask_weight == Ssim.mask_weight
    without = {k: v for k, v in cfg.raw.items() if k != "ssim"}
    assert config_from_mapping(without).ssim == Ssim()
    assert cfg.with_overrides({"ssim.epsilon": 0.25}).ssim.epsilon == 0.25
    with pytest.raises(ConfigError, match="unknown keys"):
        config_from_mapping({**cfg.raw, "ssim": {**cfg.raw["ssim"], "epsilom": 0.3}})
    with pytest.raises(ConfigError, match="ssim.mode"):
        cfg.with_overrides({"ssim.mode": "sometimes"})
    with pytest.raises(ConfigError, match="epsilon"):
        Ssim(epsilon=1.0)


# ----------------------------------------------------------------------------- search


def test_selection_ratio_responds_to_epsilon_and_lambda(cfg):
    # Higher epsilon: a pair must fit its target better (loss < lambda / epsilon) -> fewer.
    # (~0.75 vs ~0.2 here over several seeds.)
    assert _ratio(cfg, epsilon=0.2) > _ratio(cfg, epsilon=0.9) + 0.2
    # Higher lambda: the KL(1 || G) term holds more gates open -> more (~0.93 vs ~0).
    assert _ratio(cfg, mask_weight=0.2) > _ratio(cfg, mask_weight=0.001) + 0.5


def test_search_saves_a_set_that_reloads_to_the_same_selection(cfg, shared):
    m = shared.manifest
    assert (shared.path / S.PAIRS_FILE).is_file() and shared.path.parent == cfg.paths.lake_root / "ssim"
    assert m["days"] == DAYS and m["model_kind"] == "mmn" and m["epsilon"] == SHARED_SEARCH.epsilon
    assert m["ssim"]["epochs"] == 2 and m["search"]["steps"] > 0
    assert m["lambda"] == SHARED_SEARCH.mask_weight and 0 < m["selection_ratio"] < 1
    assert set(m["selection_ratio_per_domain"]) == {f"type_{t}/scenario_{s}" for t in range(N_TYPES)
                                                    for s in range(N_SCENARIOS)}
    pairs = shared.pairs
    assert list(pairs.columns) == ["impression_id", "day", "type_id", "scenario_id", "score", "shared"]
    assert (pairs["shared"] == (pairs["score"] > SHARED_SEARCH.epsilon)).all()
    assert not pairs.duplicated(["impression_id", "type_id", "scenario_id"]).any()
    # Every training row of a domain is a candidate for each other scenario of its type.
    assert len(pairs) == 2 * pairs["impression_id"].nunique()

    loaded = S.load_shared_set(cfg, shared.set_id)
    pd.testing.assert_frame_equal(loaded.pairs, shared.pairs)
    assert loaded.manifest == m
    for ratio in (None, 0.0, 0.1, 0.25, 1.0):
        pd.testing.assert_frame_equal(loaded.selection(ratio), shared.selection(ratio))
    top = loaded.selection(0.25)
    for (t, s), group in top.groupby(["type_id", "scenario_id"]):
        candidates = pairs[(pairs["type_id"] == t) & (pairs["scenario_id"] == s)]
        assert len(group) == math.floor(0.25 * len(candidates))
        assert group["score"].min() >= candidates["score"].nlargest(len(group)).min()
    assert len(loaded.selection(0.0)) == 0 and len(loaded.selection(1.0)) == len(pairs)


def test_latest_set_is_loaded_by_default(tmp_path):
    cfg = _cfg(tmp_path)
    write_days(cfg, DAYS[:1], 600, N_TYPES, N_SCENARIOS, seed=2)
    with pytest.raises(FileNotFoundError, match="run the search"):
        S.load_shared_set(cfg)
    first = S.search(cfg, DAYS[:1], max_steps=2)
    second = S.search(cfg, DAYS[:1], model_kind="dnn", max_steps=2)
    assert S.load_shared_set(cfg).set_id == second.set_id != first.set_id
    assert [m["set_id"] for m in S.list_shared_sets(cfg)] == [first.set_id, second.set_id]


@pytest.mark.parametrize("kind", ["dnn", "star"])
def test_search_works_for_other_backbones_and_across_types(cfg, kind):
    got = S.search(cfg, DAYS[:1], model_kind=kind, max_steps=3,
                   ssim=Ssim(across_types=True, selector_input="shared"))
    pairs = got.pairs
    assert got.manifest["model_kind"] == kind
    assert len(pairs) == (N_TYPES * N_SCENARIOS - 1) * pairs["impression_id"].nunique()
    assert set(pairs["type_id"]) == set(range(N_TYPES))


def test_impression_ids_repeated_across_days_are_refused(tmp_path):
    cfg = _cfg(tmp_path)
    samples, _ = make_day(cfg, DAYS[0], 400, N_TYPES, N_SCENARIOS)
    for day in DAYS:
        write_day(cfg, day, samples)
    write_vocabs(cfg, N_TYPES, N_SCENARIOS)
    with pytest.raises(ValueError, match="several days"):
        S.search(cfg, DAYS, max_steps=1)


# ----------------------------------------------------------------------------- reuse


def _assert_same_weights(a, b):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for name, tensor in sa.items():
        assert torch.equal(tensor, sb[name]), name


def test_all_zero_mask_trains_exactly_like_no_ssim(cfg, shared):
    plain = train(cfg, DAYS, TrainOptions(progress=False))
    zero = dataclasses.replace(shared, pairs=shared.pairs.assign(shared=False))
    for hook in (S.shared_training(cfg, zero), S.shared_training(cfg, shared, 0.0)):
        assert isinstance(hook, StepLoss)
        got = train(cfg, DAYS, TrainOptions(progress=False, step_loss=hook))
        _assert_same_weights(plain, got)
        assert got.steps == plain.steps and got.step_loss_stats == {"ssim_shared_rows": 0.0}
        untimed = [{k: v for k, v in h.items() if k != "samples_per_sec"} for h in plain.history]
        assert [{k: v for k, v in h.items() if k != "samples_per_sec"} for h in got.history] == untimed


def test_reuse_refuses_ddp_and_sets_beyond_the_models_domains(cfg, shared, monkeypatch):
    import training.trainer as trainer_module

    narrow = S.shared_training(cfg, shared, 0.5)
    with pytest.raises(ValueError, match="beyond the model"):
        train(cfg, DAYS, TrainOptions(progress=False, max_steps=1, n_types=N_TYPES, n_scenarios=1,
                                      step_loss=narrow))
    monkeypatch.setattr(trainer_module, "init_distributed", lambda device: DistInfo(0, 2, 0, False))
    with pytest.raises(ValueError, match="single-process only"):
        train(cfg, DAYS, TrainOptions(progress=False, step_loss=S.shared_training(cfg, shared, 0.5)))


def test_reuse_step_loss_adds_the_shared_ctcvr_terms(cfg, shared):
    """One batch: native loss + alpha * beta / N * sum w_home * BCE of the shared copies,
    each forwarded in its target domain (MMN's rows are independent, so one forward of
    rows + copies equals separate forwards)."""
    torch.manual_seed(0)
    model = build_model(cfg, N_TYPES, N_SCENARIOS, "mmn")
    loss_cfg = loss_config(cfg, model)
    lookup = S.SharedTraining(shared, 0.5, dataclasses.replace(cfg.ssim, shared_loss_weight=0.7))
    lookup.bind(model)
    batch = next(iter(SampleStream(cfg, DAYS, with_impression_id=True, seed=4)))
    b = batch_to_device(batch, torch.device("cpu"))
    got = lookup.loss(model, b, loss_cfg)

    sel = shared.selection(0.5).set_index("impression_id")
    rows, t, s = [], [], []
    for i, imp in enumerate(b["impression_id"]):
        if imp in sel.index:
            hits = sel.loc[[imp]]
            rows += [i] * len(hits)
            t += hits["type_id"].tolist()
            s += hits["scenario_id"].tolist()
    assert rows and lookup.rows_added == len(rows)
    rows_t = torch.tensor(rows)
    p_ctr, p_cvr = model(b["features"], b["type_id"], b["scenario_id"])
    main = loss_from_config(loss_cfg, p_ctr, p_cvr, b)
    q_ctr, q_cvr = model(b["features"][rows_t], torch.tensor(t), torch.tensor(s))
    w = (domain_weights(b["type_id"], b["scenario_id"])[rows_t] if loss_cfg.dynamic_weight
         else torch.ones(len(rows)))  # each copy carries its home row's CTCVR weight
    extra = (bce(q_ctr * q_cvr, b["conversion"][rows_t]) * w).sum() * (0.7 * cfg.model.alpha / len(b["click"]))
    assert torch.allclose(got.total, main.total + extra, atol=1e-6)
    assert torch.allclose(got.ctcvr, main.ctcvr, atol=1e-6)


def test_search_and_reuse_end_to_end_with_mlflow(cfg):
    import mlflow

    from mmn.tasks import setup_mlflow

    setup_mlflow(cfg, experiment="ssim_tests")
    with mlflow.start_run() as run:
        out = S.run_search_for_day(cfg, "2024-03-03", DAYS, "mmn", max_steps=10)
    assert out["ratio"] in SEARCH.ratio_grid
    assert [r["ratio"] for r in out["ratio_table"]] == list(SEARCH.ratio_grid)
    assert sum(r["chosen"] for r in out["ratio_table"]) == 1
    reused = S.load_shared_set(cfg)
    assert reused.set_id == out["set_id"] and reused.chosen_ratio == out["ratio"]
    assert reused.manifest["chosen_for_day"] == "2024-03-03"
    assert str(reused.path) == out["path"]

    data = mlflow.get_run(run.info.run_id).data
    assert data.metrics["ssim/selection_ratio"] == pytest.approx(out["selection_ratio"])
    assert data.metrics["ssim/chosen_ratio"] == out["ratio"]
    assert data.tags["ssim.set_id"] == out["set_id"]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, f"ssim/{out['set_id']}")}
    assert f"ssim/{out['set_id']}/{S.PAIRS_FILE}" in artifacts

    result = train(cfg, DAYS, TrainOptions(progress=False, step_loss=S.shared_training(cfg, reused, 0.2)))
    assert result.step_loss_stats["ssim_shared_rows"] > 0
    metrics = S.slice_metrics(cfg, result.model, DAYS, (BucketRange(0, 1000, keep=True),),
                              N_TYPES, N_SCENARIOS)
    assert np.isfinite(metrics["cvr_auc"])
