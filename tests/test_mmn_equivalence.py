"""The fast auto-masking forward must compute exactly what the naive reference computes."""

from __future__ import annotations

import pytest
import torch

from core.config import load_config
from mmn.model_kinds import MODEL_KINDS
from training.models import MMN, available_models, build_model, loss_config
from training.models import mmn as mmn_module

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_TYPES, N_SCENARIOS = 4, 3


@pytest.fixture(scope="module")
def cfg():
    return load_config(overrides={"model.ctr_hidden": [16, 8], "model.cvr_hidden": [32, 16, 8],
                                  "model.embedding_dim": 4})


def _model(cfg, domain_params: str, seed: int = 0) -> MMN:
    """``domain_params`` "wide": full parameter sets plus the domain-composed wide term."""
    torch.manual_seed(seed)
    wide = domain_params == "wide"
    model = MMN.from_config(cfg, N_TYPES, N_SCENARIOS, domain_params="full" if wide else domain_params,
                            wide=wide)
    with torch.no_grad():  # domain deltas start at zero; make every parameter set matter
        extra = list(model.wide.parameters()) if wide else []
        for p in [*model.cvr_tower.parameters(), *extra]:
            p.add_(torch.randn_like(p) * 0.2)
    return model


def _batch(cfg, n: int = 96, seed: int = 1):
    """Mixed batch where type 2, scenario 1 and several (type, scenario) pairs are absent."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.stack([torch.randint(0, f.cardinality, (n,), generator=g) for f in cfg.features], 1)
    types = torch.tensor([0, 1, 3])[torch.randint(0, 3, (n,), generator=g)]
    scenarios = torch.tensor([0, 2])[torch.randint(0, 2, (n,), generator=g)]
    scenarios[types == 3] = 0  # (3, 2) absent too
    return feats, types, scenarios


def _outputs_and_grads(model: MMN, fn, feats, types, scenarios, weights):
    model.zero_grad(set_to_none=False)
    p_ctr, p_cvr = fn(feats, types, scenarios)
    loss = (weights[0] * p_ctr).sum() + (weights[1] * torch.log(p_cvr)).sum()
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return p_ctr.detach(), p_cvr.detach(), grads


@pytest.mark.parametrize("domain_params", ["full", "common_only", "wide"])
@pytest.mark.parametrize("dense_max", [0, 1024, 10**9])  # all grouped / default mix / all dense
def test_fast_forward_matches_naive(cfg, domain_params, dense_max, monkeypatch):
    monkeypatch.setattr(mmn_module, "DENSE_MAX_ELEMS", dense_max)
    model = _model(cfg, domain_params)
    feats, types, scenarios = _batch(cfg)
    weights = torch.rand(2, feats.shape[0], generator=torch.Generator().manual_seed(3))
    fast = _outputs_and_grads(model, model.forward, feats, types, scenarios, weights)
    naive = _outputs_and_grads(model, model.forward_naive, feats, types, scenarios, weights)
    torch.testing.assert_close(fast[0], naive[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast[1], naive[1], atol=1e-5, rtol=1e-5)
    assert fast[2].keys() == naive[2].keys()
    for name in fast[2]:
        torch.testing.assert_close(fast[2][name], naive[2][name], atol=1e-5, rtol=1e-5, msg=name)
    if domain_params != "common_only":  # absent type 2 / scenario 1 got exactly zero gradient
        assert torch.count_nonzero(fast[2]["cvr_tower.weight_type.0"][2]) == 0
        assert torch.count_nonzero(fast[2]["cvr_tower.weight_scenario.0"][1]) == 0
        assert torch.count_nonzero(fast[2]["cvr_tower.weight_type.0"][0]) > 0
    if domain_params == "wide":
        total = model.wide.total
        by_type = fast[2]["wide.by_type.weight"].view(N_TYPES, total)
        assert torch.count_nonzero(by_type[2]) == 0 and torch.count_nonzero(by_type[0]) > 0


def test_wide_term_on_chosen_fields_adds_only_their_ids(cfg):
    """``model.wide_fields``: the wide term covers the named fields' ids and no others."""
    names = [f.name for f in cfg.features]
    chosen = cfg.with_overrides({"model.wide": True, "model.wide_fields": names[-2:]})
    model = MMN.from_config(chosen, N_TYPES, N_SCENARIOS)
    assert model.wide.total == sum(f.cardinality for f in cfg.features[-2:])
    feats, types, scenarios = _batch(cfg)
    with torch.no_grad():
        model.wide.shared.weight.normal_()
        before = model(feats, types, scenarios)[1]
        other = feats.clone()
        other[:, 0] = (other[:, 0] + 1) % cfg.features[0].cardinality  # a field it doesn't cover
        torch.testing.assert_close(model.wide(other, types, scenarios), model.wide(feats, types, scenarios))
        other[:, -1] = (other[:, -1] + 1) % cfg.features[-1].cardinality  # one it covers
        assert not torch.allclose(model.wide(other, types, scenarios), model.wide(feats, types, scenarios))
    assert before.shape == (feats.shape[0],)


def test_domains_get_different_towers(cfg):
    model = _model(cfg, "full").eval()
    feats, _, _ = _batch(cfg, n=8)
    outs = {(t, s): model.predict_domain(feats, t, s)[1] for t in range(N_TYPES) for s in range(N_SCENARIOS)}
    assert not torch.allclose(outs[(0, 0)], outs[(1, 0)])
    assert not torch.allclose(outs[(0, 0)], outs[(0, 1)])


@pytest.mark.parametrize("domain_params", ["full", "common_only", "wide"])
def test_predict_domain_equals_forward_rows(cfg, domain_params):
    model = _model(cfg, domain_params).eval()
    feats, types, scenarios = _batch(cfg)
    with torch.no_grad():
        p_ctr, p_cvr = model(feats, types, scenarios)
    for t, s in {(int(a), int(b)) for a, b in zip(types, scenarios, strict=True)}:
        rows = (types == t) & (scenarios == s)
        got_ctr, got_cvr = model.predict_domain(feats[rows], t, s)
        torch.testing.assert_close(got_ctr, p_ctr[rows], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got_cvr, p_cvr[rows], atol=1e-6, rtol=1e-5)
    single_ctr, single_cvr = model.predict_domain(feats[0], int(types[0]), int(scenarios[0]))
    assert single_cvr.shape == (1,)
    torch.testing.assert_close(single_cvr[0], p_cvr[0], atol=1e-6, rtol=1e-5)


def test_predict_cache_tracks_weight_changes(cfg):
    model = _model(cfg, "full").eval()
    feats, types, scenarios = _batch(cfg, n=16)
    before = model.predict_domain(feats, 1, 2)[1]
    # An optimizer step (in-place, no train() call) must not be served from a stale cache.
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(feats, torch.full_like(types, 1), torch.full_like(scenarios, 2))[1].sum().backward()
    opt.step()
    after_step = model.predict_domain(feats, 1, 2)[1]
    with torch.no_grad():
        expected = model(feats, torch.full_like(types, 1), torch.full_like(scenarios, 2))[1]
    assert not torch.allclose(before, after_step)
    torch.testing.assert_close(after_step, expected, atol=1e-6, rtol=1e-5)
    other = _model(cfg, "full", seed=7)
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(model.predict_domain(feats, 1, 2)[1],
                               other.eval().predict_domain(feats, 1, 2)[1])
    with pytest.raises(ValueError, match="type_id"):
        model.predict_domain(feats, N_TYPES, 0)


def test_zoo_kinds_and_parameter_sets(cfg):
    assert set(available_models()) == set(MODEL_KINDS)
    feats, types, scenarios = _batch(cfg, n=10)
    expected_sets = {"mmn": N_TYPES + N_SCENARIOS + 1, "mmn_no_dynamic_weight": N_TYPES + N_SCENARIOS + 1,
                     "mmn_paper": N_TYPES + N_SCENARIOS + 1, "mmn_common_only": 1, "dnn": 1}
    dynamic = {"mmn_paper": True, "mmn_no_dynamic_weight": False}  # pinned; others: the config's
    for kind, n_sets in expected_sets.items():
        model = build_model(cfg, N_TYPES, N_SCENARIOS, kind)
        assert model.kind == kind and model.n_domain_param_sets == n_sets
        assert loss_config(cfg, model).dynamic_weight == dynamic.get(kind, cfg.model.dynamic_weight)
        p_ctr, p_cvr = model(feats, types, scenarios)
        assert p_ctr.shape == p_cvr.shape == (10,)
        assert ((p_cvr > 0) & (p_cvr < 1)).all()
        rebuilt = build_model(cfg, N_TYPES, N_SCENARIOS, model.kind)
        rebuilt.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match="max_types"):
        build_model(cfg, cfg.domains.max_types + 1, 2)
    with pytest.raises(ValueError, match="unknown model kind"):
        build_model(cfg, 2, 2, "nope")


def test_embedding_rejects_out_of_range_ids(cfg):
    model = build_model(cfg, N_TYPES, N_SCENARIOS, "mmn")
    feats, types, scenarios = _batch(cfg, n=4)
    with pytest.raises(ValueError, match="conversion_type"):
        model(feats, torch.full_like(types, N_TYPES), scenarios)
    bad = feats.clone()
    bad[0, 0] = cfg.features[0].cardinality
    with pytest.raises(ValueError, match=cfg.features[0].name):
        model(bad, types, scenarios)


def test_domain_lr_scale_gives_mmn_deltas_their_own_learning_rate(cfg):
    from dataclasses import replace

    from training.trainer import make_optimizer, parameter_groups

    scaled = replace(cfg, training=replace(cfg.training, domain_lr_scale=0.1))
    model = build_model(scaled, 3, 2, "mmn")
    groups = make_optimizer(scaled, parameter_groups(scaled, model), torch.device("cpu")).param_groups
    assert [g["lr"] for g in groups] == [pytest.approx(cfg.training.learning_rate),
                                         pytest.approx(cfg.training.learning_rate * 0.1)]
    deltas = {id(p) for p in groups[1]["params"]}
    wide = 2 if model.wide is not None else 0  # the wide term's type and scenario tables
    assert deltas == {id(p) for p in model.domain_parameters()}
    assert len(deltas) == 4 * model.cvr_tower.n_layers + wide
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())
    # A model without domain-specific parameters, or scale 1, keeps one group.
    assert len(parameter_groups(scaled, build_model(scaled, 3, 2, "dnn"))) == 1
    plain = replace(cfg, training=replace(cfg.training, domain_lr_scale=1.0,
                                          domain_weight_decay=cfg.training.shared_weight_decay))
    assert len(parameter_groups(plain, model)) == 1  # the same lr and decay for every parameter


def _train_steps(cfg, sparse: bool, steps: int = 6) -> tuple[MMN, list[dict]]:
    """A few Adagrad steps of the wide MMN through the trainer's parameter groups."""
    from training.trainer import make_optimizer, parameter_groups

    model = _model(cfg, "wide", seed=4)
    model.use_sparse_gradients(sparse)
    groups = parameter_groups(cfg, model)
    optimizer = make_optimizer(cfg, groups, torch.device("cpu"))
    for step in range(steps):
        feats, types, scenarios = _batch(cfg, seed=10 + step)
        optimizer.zero_grad(set_to_none=True)
        p_ctr, p_cvr = model(feats, types, scenarios)
        (p_ctr.sum() - torch.log(p_cvr).sum()).backward()
        optimizer.step()
    return model, groups


def test_sparse_wide_gradients_train_exactly_like_dense_ones(cfg):
    """The wide term's domain tables with sparse gradients and Adagrad's sparse step: the same
    parameters after several steps as dense gradients and the fused dense step (untouched rows
    stay where a zero gradient leaves them)."""
    from dataclasses import replace

    from training.trainer import sparse_gradients_allowed

    assert sparse_gradients_allowed(cfg.training, world_size=1)
    sparse_model, groups = _train_steps(cfg, sparse=True)
    dense_model, dense_groups = _train_steps(cfg, sparse=False)
    tables = {id(t.weight) for t in sparse_model.wide.domain_tables()}
    assert [g.get("fused") for g in groups if {id(p) for p in g["params"]} & tables] == [False]
    assert len(groups) == len(dense_groups) + 1
    assert sparse_model.wide.by_type.weight.grad.is_sparse
    dense_state = dense_model.state_dict()
    for name, value in sparse_model.state_dict().items():
        torch.testing.assert_close(value, dense_state[name], atol=1e-5, rtol=1e-5, msg=name)
    moved = sparse_model.wide.by_type.weight.detach() != _model(cfg, "wide", seed=4).wide.by_type.weight
    assert 0 < int(moved.sum()) < moved.numel()  # some rows trained, most untouched
    # Where the optimizer could not take them, the trainer keeps gradients dense.
    assert not sparse_gradients_allowed(cfg.training, world_size=2)
    assert not sparse_gradients_allowed(replace(cfg.training, optimizer="adam"), world_size=1)
    assert not sparse_gradients_allowed(replace(cfg.training, domain_weight_decay=1e-4), world_size=1)
