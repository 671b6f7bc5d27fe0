"""The MMN paper's baselines in the model zoo: interface, per-domain routing, training,
STAR's partitioned normalization, DPG's exact weighting, MI-DPG's MI regularizer."""

from __future__ import annotations

import copy

import pytest
import torch

from core.config import load_config
from mmn.model_kinds import MODEL_KINDS
from simulation.synthetic import write_days
from training.losses import mmn_loss
from training.models import MIDPG, PLE, STAR, available_models, build_model
from training.models import dpg as dpg_module
from training.models.dpg import DPG, VARIANTS
from training.options import TrainOptions
from training.trainer import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_TYPES, N_SCENARIOS = 3, 2
BASELINES = [k for k in MODEL_KINDS if not k.startswith("mmn")]
SMALL_FEATURES = [
    {"name": "user_id", "kind": "categorical", "buckets": 500},
    {"name": "ad_id", "kind": "categorical", "buckets": 200},
    {"name": "ad_category", "kind": "categorical", "buckets": 30},
    {"name": "user_age", "kind": "numeric", "boundaries": [18, 25, 35, 45, 55, 65]},
]
EXPECTED_SETS = {
    "dnn": 1, "esmm": 1, "mmoe_type": N_TYPES, "mmoe_scen": N_SCENARIOS, "ple_type": N_TYPES,
    "ple_scen": N_SCENARIOS, "mt_fwfm": N_TYPES, "star": N_TYPES * N_SCENARIOS,
    "dpg_full": 1, "dpg_rowcol": 1, "dpg_row": 1, "dpg_col": 1, "mi_dpg": 1,
}


@pytest.fixture(scope="module")
def cfg():
    return load_config(overrides={"model.ctr_hidden": [8], "model.cvr_hidden": [16, 8],
                                  "model.embedding_dim": 4, "features": SMALL_FEATURES})


def _model(cfg, kind: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(cfg, N_TYPES, N_SCENARIOS, kind)


def _batch(cfg, n: int = 96, seed: int = 1):
    """Every domain present, with a learnable CTR / CVR signal that differs by domain."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.stack([torch.randint(0, f.cardinality, (n,), generator=g) for f in cfg.features], 1)
    types = torch.arange(n) % N_TYPES
    scenarios = (torch.arange(n) // N_TYPES) % N_SCENARIOS
    signal = ((feats[:, 0] % 3) - 1).float() * (types.float() - 1) + 0.5 * scenarios.float()
    click = (torch.rand(n, generator=g) < torch.sigmoid((feats[:, 1] % 2).float() * 2 - 1)).float()
    conversion = click * (torch.rand(n, generator=g) < torch.sigmoid(2 * signal)).float()
    return feats, types, scenarios, click, conversion


def _loss(model, feats, types, scenarios, click, conversion) -> tuple[torch.Tensor, torch.Tensor]:
    """(main CTR + CTCVR loss, total with the model's auxiliary term when it has one)."""
    p_ctr, p_cvr = model(feats, types, scenarios)
    main = mmn_loss(p_ctr, p_cvr, click, conversion, types, scenarios, alpha=1.0,
                    dynamic_weight=True).total
    aux = getattr(model, "auxiliary_loss", None)
    return main, main + aux() if callable(aux) else main


def test_zoo_registers_model_kinds_with_honest_param_sets(cfg):
    assert set(available_models()) == set(MODEL_KINDS)
    assert MODEL_KINDS[:5] == ("mmn", "mmn_paper", "mmn_common_only", "mmn_no_dynamic_weight", "dnn")
    for kind, n_sets in EXPECTED_SETS.items():
        model = _model(cfg, kind)
        assert model.kind == kind and model.n_domain_param_sets == n_sets, kind
        rebuilt = build_model(cfg, N_TYPES, N_SCENARIOS, kind)
        rebuilt.load_state_dict(model.state_dict())  # serving rebuilds by kind


@pytest.mark.parametrize("kind", BASELINES)
def test_shapes_probabilities_and_predict_domain(cfg, kind):
    model = _model(cfg, kind).eval()
    feats, types, scenarios, *_ = _batch(cfg)
    with torch.no_grad():
        p_ctr, p_cvr = model(feats, types, scenarios)
    assert p_ctr.shape == p_cvr.shape == (feats.shape[0],)
    for p in (p_ctr, p_cvr):
        assert torch.isfinite(p).all() and ((p > 0) & (p < 1)).all()
    for t in range(N_TYPES):
        for s in range(N_SCENARIOS):
            rows = (types == t) & (scenarios == s)
            got_ctr, got_cvr = model.predict_domain(feats[rows], t, s)
            torch.testing.assert_close(got_ctr, p_ctr[rows], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(got_cvr, p_cvr[rows], atol=1e-6, rtol=1e-5)


def _routing_pair(cfg, target: tuple[int, int] = (1, 0)):
    """Two batches that agree on the target domain's rows and differ everywhere else."""
    feats, types, scenarios, *_ = _batch(cfg, n=60, seed=2)
    keep = (types == target[0]) & (scenarios == target[1])
    g = torch.Generator().manual_seed(9)
    other_feats = torch.stack([torch.randint(0, f.cardinality, (60,), generator=g) for f in cfg.features], 1)
    other_types = torch.randint(0, N_TYPES, (60,), generator=g)
    other_scen = torch.randint(0, N_SCENARIOS, (60,), generator=g)
    clash = (other_types == target[0]) & (other_scen == target[1])
    other_scen[clash] = (target[1] + 1) % N_SCENARIOS
    mix = keep.unsqueeze(1)
    second = (torch.where(mix, feats, other_feats), torch.where(keep, types, other_types),
              torch.where(keep, scenarios, other_scen))
    return (feats, types, scenarios), second, keep


@pytest.mark.parametrize("kind", BASELINES)
def test_prediction_depends_only_on_own_row(cfg, kind):
    model = _model(cfg, kind).eval()
    first, second, keep = _routing_pair(cfg)
    assert not torch.equal(first[1][~keep], second[1][~keep])
    with torch.no_grad():
        a, b = model(*first), model(*second)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x[keep], y[keep], atol=1e-6, rtol=1e-5)


def test_star_training_statistics_are_per_domain(cfg):
    """In training mode too, PN normalizes a domain with its own rows' statistics only."""
    model = _model(cfg, "star").train()
    first, second, keep = _routing_pair(cfg)
    with torch.no_grad():
        a, b = model(*first), model(*second)
    torch.testing.assert_close(a[1][keep], b[1][keep], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", BASELINES)
def test_training_steps_reduce_the_loss(cfg, kind):
    model = _model(cfg, kind).train()
    batch = _batch(cfg, n=192)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(25):
        main, total = _loss(model, *batch)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(float(main.detach()))
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], (kind, losses[0], losses[-3:])


def test_star_eval_uses_running_per_domain_statistics(cfg):
    model = _model(cfg, "star")
    norm = model.norm
    feats, types, scenarios, *_ = _batch(cfg, n=48)
    domain = model.domain_of(types, scenarios)
    absent = N_TYPES * N_SCENARIOS - 1  # drop one domain from the batch
    present = domain != absent
    feats, types, scenarios, domain = feats[present], types[present], scenarios[present], domain[present]
    with torch.no_grad():
        norm.domain_weight.normal_(1.0, 0.3)
        norm.domain_bias.normal_(0.0, 0.3)
        x = model.embedding(feats, types, scenarios) * 50  # clearly non-standard statistics
        model.train()
        train_out = norm(x, domain)
    for d in range(N_TYPES * N_SCENARIOS):
        rows = x[domain == d]
        if d == absent:  # untouched by a batch without it
            assert torch.equal(norm.running_mean[d], torch.zeros_like(norm.running_mean[d]))
            assert torch.equal(norm.running_var[d], torch.ones_like(norm.running_var[d]))
            continue
        torch.testing.assert_close(norm.running_mean[d], 0.1 * rows.mean(0))
        torch.testing.assert_close(norm.running_var[d], 0.9 + 0.1 * rows.var(0, unbiased=True))
        # training mode: the domain's own batch statistics
        expected = ((rows - rows.mean(0)) / torch.sqrt(rows.var(0, unbiased=False) + norm.eps)
                    * norm.weight * norm.domain_weight[d] + norm.bias + norm.domain_bias[d])
        torch.testing.assert_close(train_out[domain == d], expected, atol=1e-4, rtol=1e-4)
    model.eval()
    with torch.no_grad():
        eval_out = norm(x, domain)
        expected = ((x - norm.running_mean[domain]) / torch.sqrt(norm.running_var[domain] + norm.eps)
                    * norm.weight * norm.domain_weight[domain] + norm.bias + norm.domain_bias[domain])
        torch.testing.assert_close(eval_out, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(eval_out, train_out, atol=1e-3)
        # and the whole model's eval prediction follows the running statistics
        before = model(feats, types, scenarios)[1]
        norm.running_mean[int(domain[0])] += 1.0
        after = model(feats, types, scenarios)[1]
    same = domain == domain[0]
    assert not torch.allclose(before[same], after[same])
    torch.testing.assert_close(before[~same], after[~same])
    assert {"norm.running_mean", "norm.running_var"} <= set(model.state_dict())


def test_star_layers_compose_shared_times_domain_weights(cfg):
    model: STAR = _model(cfg, "star").eval()
    with torch.no_grad():
        for p in model.star.domain_weight:
            p.normal_(1.0, 0.5)
        for p in model.star.domain_bias:
            p.normal_(0.0, 0.5)
    feats, types, scenarios, *_ = _batch(cfg, n=30)
    domain = model.domain_of(types, scenarios)
    with torch.no_grad():
        z = torch.randn(30, model.embedding.output_dim)
        got = model.star(z, domain)
        for i in range(30):
            h, d = z[i], int(domain[i])
            for k, (w, b) in enumerate(zip(model.star.weight, model.star.bias, strict=True)):
                h = h @ (w * model.star.domain_weight[k][d]) + b + model.star.domain_bias[k][d]
                h = torch.relu(h) if k < len(model.star.weight) - 1 else h
            torch.testing.assert_close(got[i], h[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("compose_max", [0, dpg_module.COMPOSE_MAX_ELEMS])  # low-rank trick / composed
@pytest.mark.parametrize("variant", VARIANTS)
def test_dpg_forward_equals_explicit_weighted_backbone(cfg, variant, compose_max, monkeypatch):
    """Every variant computes h @ (W (.) (1 + D(d))) + b exactly, D built explicitly here."""
    monkeypatch.setattr(dpg_module, "COMPOSE_MAX_ELEMS", compose_max)
    torch.manual_seed(0)
    model = DPG.from_config(cfg, N_TYPES, N_SCENARIOS, variant=variant).eval()
    with torch.no_grad():
        model.embedding.table.weight.normal_(0.0, 1.0)
    feats, types, scenarios, *_ = _batch(cfg, n=24)
    with torch.no_grad():
        got = model(feats, types, scenarios)[1]
        x = model.embedding(feats, types, scenarios)
        for i in range(24):
            cond = model.scenario_input(types[i:i + 1], scenarios[i:i + 1])
            h = x[i]
            for k, (layer, (rows, cols)) in enumerate(zip(model.layers, model.domain_factors(cond),
                                                          strict=True)):
                if variant == "full":
                    delta = rows[0]
                else:
                    u = rows[0] if rows.dim() == 3 else rows
                    v = cols[0] if cols.dim() == 3 else cols
                    delta = u @ v.T
                h = h @ (layer.weight * (1 + delta)) + layer.bias
                h = torch.relu(h) if k < len(model.layers) - 1 else h
            torch.testing.assert_close(got[i], torch.sigmoid(h[0]), atol=1e-5, rtol=1e-5)
    generated = {n.split(".")[-2] for n, _ in model.named_parameters() if ".gen_" in n}
    assert generated == {"full": {"gen_full"}, "rowcol": {"gen_rows", "gen_cols"},
                         "row": {"gen_rows"}, "col": {"gen_cols"}}[variant]


def test_ple_with_several_levels_routes_and_trains(cfg):
    deep = cfg.with_overrides({"model.cvr_hidden": [16, 8, 8]})
    torch.manual_seed(0)
    model = PLE.from_config(deep, N_TYPES, N_SCENARIOS, task_axis="type")
    assert len(model.levels) == 2 and model.levels[0].shared_gate is not None
    first, second, keep = _routing_pair(cfg)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(*first)[1][keep], model(*second)[1][keep])
    model.train()
    batch = _batch(cfg, n=192)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    start = float(_loss(model, *batch)[0].detach())
    for _ in range(20):
        loss = _loss(model, *batch)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(_loss(model, *batch)[0].detach()) < 0.9 * start


def _trained_mi(model: MIDPG, cond: torch.Tensor, summary: torch.Tensor, steps: int = 150) -> float:
    """Fit the discriminator alone on fixed pairs, then return the MI estimate."""
    disc = model.discriminator
    opt = torch.optim.Adam(disc.parameters(), lr=5e-3)
    for _ in range(steps):
        loss = -model.mi_estimate(cond, summary)
        opt.zero_grad()
        loss.backward()
        opt.step()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return float(torch.stack([model.mi_estimate(cond, summary, torch.randperm(len(cond), generator=g))
                                  for _ in range(8)]).mean())


def test_mi_estimate_rises_when_weighting_matrices_carry_domain_information(cfg):
    torch.manual_seed(0)
    model: MIDPG = _model(cfg, "mi_dpg")
    assert model.mi_weight == 0.1
    with torch.no_grad():
        model.embedding.table.weight.normal_(0.0, 1.0)  # distinct domain inputs
    types = torch.arange(240) % N_TYPES
    scenarios = (torch.arange(240) // N_TYPES) % N_SCENARIOS
    cond = model.scenario_input(types, scenarios).detach()
    summary = model.weight_summary(cond).detach()
    assert summary.shape == (240, sum(layer.fan_in + layer.fan_out for layer in model.layers))
    init = copy.deepcopy(model.discriminator.state_dict())
    estimates = {}
    g = torch.Generator().manual_seed(3)
    for case, b in {"informative": summary,
                    "shuffled": summary[torch.randperm(240, generator=g)],
                    "constant": summary.mean(0, keepdim=True).expand_as(summary)}.items():
        model.discriminator.load_state_dict(init)
        torch.manual_seed(1)
        estimates[case] = _trained_mi(model, cond, b)
    assert estimates["informative"] > 0.5, estimates
    assert estimates["informative"] > estimates["shuffled"] + 0.3, estimates
    assert estimates["informative"] > estimates["constant"] + 0.3, estimates


def test_mi_dpg_auxiliary_loss_trains_generator_and_discriminator(cfg):
    model: MIDPG = _model(cfg, "mi_dpg").train()
    feats, types, scenarios, *_ = _batch(cfg)
    model(feats, types, scenarios)
    aux = model.auxiliary_loss()
    assert aux.dim() == 0 and torch.isfinite(aux) and model.last_mi is not None
    aux.backward()
    for prefix in ("discriminator.", "generator.", "layers.0.gen_rows", "embedding."):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefix)]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), prefix
    assert float(model.auxiliary_loss()) == 0.0  # consumed
    model.eval()
    with torch.no_grad():
        model(feats, types, scenarios)
    assert float(model.auxiliary_loss()) == 0.0  # no regularizer outside training


def test_trainer_adds_the_auxiliary_loss(tmp_path, monkeypatch):
    cfg = load_config(overrides={
        "paths.lake_root": str(tmp_path / "lake"), "paths.truth_root": str(tmp_path / "truth"),
        "model.embedding_dim": 4, "model.ctr_hidden": [8], "model.cvr_hidden": [8],
        "training.batch_size": 64, "training.shuffle_buffer": 256, "training.read_batch_rows": 128,
        "training.validation_fraction": 0.0, "features": SMALL_FEATURES,
    })
    write_days(cfg, ["2024-03-01"], n_rows=400, n_types=N_TYPES, n_scenarios=N_SCENARIOS)
    calls = []
    original = MIDPG.auxiliary_loss

    def spy(self):
        loss = original(self)
        calls.append(float(loss.detach()))
        return loss

    monkeypatch.setattr(MIDPG, "auxiliary_loss", spy)
    result = train(cfg, ["2024-03-01"], TrainOptions(model_kind="mi_dpg", max_steps=3, progress=False,
                                                     log_every_steps=1))
    assert result.steps == 3 and len(calls) == 3 and all(c != 0.0 for c in calls)
    assert len(result.history) == 3


def test_mmn_paper_pins_the_papers_loss_and_optimizer_whatever_the_defaults(cfg):
    from training.models import loss_config, training_config
    from training.trainer import parameter_groups

    changed = cfg.with_overrides({"model.dynamic_weight": False, "model.cvr_loss_weight": 1.0,
                                  "training.optimizer": "adam", "training.domain_lr_scale": 0.1,
                                  "training.domain_weight_decay": 0.01})
    paper = build_model(changed, N_TYPES, N_SCENARIOS, "mmn_paper")
    assert paper.n_domain_param_sets == N_TYPES + N_SCENARIOS + 1
    loss = loss_config(changed, paper)
    assert loss.dynamic_weight is True and loss.cvr_loss_weight == 0.0 and loss.alpha == 1.0
    training = training_config(changed, paper)
    assert training.optimizer == "adagrad" and training.domain_lr_scale == 1.0
    assert len(parameter_groups(changed, paper)) == 1  # deltas trained like shared weights
    default = build_model(changed, N_TYPES, N_SCENARIOS, "mmn")
    groups = parameter_groups(changed, default)
    assert len(groups) == 2 and groups[1]["weight_decay"] == 0.01
    assert groups[1]["lr"] == changed.training.learning_rate * 0.1
