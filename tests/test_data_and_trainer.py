"""Streaming the samples Parquet, hash splits, sharding, and the trainer's guarantees."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from core.config import load_config
from core.hashing import signed_xxhash64
from simulation.synthetic import make_day, write_day, write_vocabs
from training.data import SampleStream, count_rows, hash_buckets
from training.options import TrainOptions
from training.trainer import NonFiniteLossError, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DAYS = ["2024-02-01", "2024-02-02"]
N_TYPES, N_SCENARIOS = 3, 2
# Smaller id spaces than conf/pipeline.yaml keep the embedding table (and the tests) light.
SMALL_FEATURES = [
    {"name": "user_id", "kind": "categorical", "buckets": 1000},
    {"name": "ad_id", "kind": "categorical", "buckets": 300},
    {"name": "ad_category", "kind": "categorical", "buckets": 50},
    {"name": "user_age", "kind": "numeric", "boundaries": [18, 25, 35, 45, 55, 65]},
]


def _cfg(tmp_path: Path, **overrides):
    base = {
        "paths.lake_root": str(tmp_path / "lake"), "paths.truth_root": str(tmp_path / "truth"),
        "model.embedding_dim": 4, "model.ctr_hidden": [16], "model.cvr_hidden": [16, 8],
        "training.batch_size": 64, "training.shuffle_buffer": 300, "training.read_batch_rows": 100,
        "training.eval_every_steps": 20, "training.checkpoint_every_steps": 20,
        "training.early_stopping_patience": 100, "training.validation_fraction": 0.1,
        "features": SMALL_FEATURES,
    }
    return load_config(overrides={**base, **overrides})


def _hand_table(cfg, day: str, n: int) -> pa.Table:
    """A samples table written field by field from the contract in docs/contracts.md."""
    rng = np.random.default_rng(5)
    t, s = rng.integers(0, N_TYPES, n), rng.integers(0, N_SCENARIOS, n)
    ids = np.array([f"{day}-imp-{i:05d}" for i in range(n)])
    order = np.lexsort((ids, s, t))
    cols = {
        "impression_id": pa.array(ids[order]),
        "ts": pa.array(np.full(n, np.datetime64(f"{day}T12:00:00", "us")), pa.timestamp("us", tz="UTC")),
        "conversion_type": pa.array([f"type_{v}" for v in t[order]]),
        "display_scenario": pa.array([f"scenario_{v}" for v in s[order]]),
        "type_id": pa.array(t[order], pa.int32()),
        "scenario_id": pa.array(s[order], pa.int32()),
    }
    for f in cfg.features:
        cols[f.column] = pa.array(rng.integers(0, f.cardinality, n), pa.int32())
    click = rng.random(n) < 0.3
    cols["click"] = pa.array(click.astype(np.int32))
    cols["conversion"] = pa.array((click & (rng.random(n) < 0.3)).astype(np.int32))
    return pa.table(cols)


@pytest.fixture()
def hand_cfg(tmp_path):
    cfg = _cfg(tmp_path)
    for day in DAYS:
        write_day(cfg, day, _hand_table(cfg, day, 1000), n_files=2, row_group_size=250)
    write_vocabs(cfg, N_TYPES, N_SCENARIOS)
    return cfg


def _ids(stream) -> list[str]:
    return [i for b in stream for i in b["impression_id"]]


def test_stream_reads_every_row_once_shuffled_and_bounded(hand_cfg):
    stream = SampleStream(hand_cfg, DAYS, with_impression_id=True, seed=3)
    batches = list(stream)
    ids = [i for b in batches for i in b["impression_id"]]
    assert len(ids) == len(set(ids)) == 2000 == count_rows(hand_cfg, DAYS)
    file_order = [i for d in DAYS for p in sorted(hand_cfg.paths.samples_dir(d).glob("*.parquet"))
                  for i in pq.read_table(p, columns=["impression_id"]).column(0).to_pylist()]
    assert ids != file_order
    assert 0 < stream.max_buffered_rows <= hand_cfg.training.shuffle_buffer + hand_cfg.training.read_batch_rows
    b = batches[0]
    assert b["features"].dtype == torch.long and b["features"].shape == (64, len(hand_cfg.features))
    assert b["type_id"].dtype == torch.long and b["click"].dtype == torch.float32
    assert all(len(x["click"]) == 64 for x in batches[:-1])
    # Files are sorted by domain; reading shuffled row groups round-robin mixes domains early.
    first_domains = {(int(t), int(s)) for t, s in zip(b["type_id"], b["scenario_id"], strict=True)}
    assert len(first_domains) >= 4
    assert _ids(SampleStream(hand_cfg, DAYS, with_impression_id=True, seed=3)) == ids
    assert _ids(SampleStream(hand_cfg, DAYS, with_impression_id=True, seed=3, epoch=1)) != ids
    unshuffled = _ids(SampleStream(hand_cfg, DAYS, with_impression_id=True, shuffle=False,
                                   interleave=1))
    assert unshuffled == file_order


def test_hash_split_is_deterministic_and_partitions(hand_cfg):
    def split(name):
        return _ids(SampleStream(hand_cfg, DAYS, split=name, holdout_fraction=0.25,
                                 with_impression_id=True, seed=9))

    holdout, rest = split("holdout"), split("train")
    assert set(holdout).isdisjoint(rest) and len(holdout) + len(rest) == 2000
    assert set(holdout) == set(split("holdout"))
    expected = {i for i in holdout + rest if signed_xxhash64(i) % 10000 < 2500}
    assert set(holdout) == expected
    assert 0.18 < len(holdout) / 2000 < 0.32
    assert list(hash_buckets(["a", "b"])) == [signed_xxhash64("a") % 10000, signed_xxhash64("b") % 10000]


@pytest.mark.parametrize("world_size", [2, 3, 17])  # by file; by row group; by row stride
def test_rank_shards_are_disjoint_and_complete(hand_cfg, world_size):
    shards = [set(_ids(SampleStream(hand_cfg, DAYS[:1], rank=r, world_size=world_size,
                                    with_impression_id=True))) for r in range(world_size)]
    assert sum(len(s) for s in shards) == len(set().union(*shards)) == 1000
    assert min(len(s) for s in shards) > 0


def test_missing_day_names_the_day(hand_cfg):
    with pytest.raises(FileNotFoundError, match="2031-01-01"):
        SampleStream(hand_cfg, ["2031-01-01"])


def test_missing_column_is_reported(hand_cfg, tmp_path):
    path = hand_cfg.paths.samples_dir(DAYS[0]) / "part-00000.parquet"
    pq.write_table(pq.read_table(path).drop(["click"]), path)
    with pytest.raises(ValueError, match="click"):
        list(SampleStream(hand_cfg, DAYS[:1], shuffle=False))


# --------------------------------------------------------------------------- trainer


@pytest.fixture()
def signal_cfg(tmp_path):
    cfg = _cfg(tmp_path, **{"training.batch_size": 128, "training.shuffle_buffer": 2000,
                            "training.read_batch_rows": 500, "training.eval_every_steps": 25,
                            "training.epochs": 3,
                            # This synthetic signal is almost all per-domain and the run is
                            # ~300 steps: the deltas learn at the full rate here. (The default
                            # 0.1 is for conversion-poor data; at 0.1 this run reaches a
                            # validation CVR AUC of 0.66 instead of > 0.7.)
                            "training.domain_lr_scale": 1.0})
    for day in DAYS:
        samples, truth = make_day(cfg, day, 6000, N_TYPES, N_SCENARIOS, seed=1)
        write_day(cfg, day, samples, truth)
    write_vocabs(cfg, N_TYPES, N_SCENARIOS)
    return cfg


def test_training_on_a_learnable_signal_lowers_validation_loss(signal_cfg):
    logged = []
    result = train(signal_cfg, DAYS, TrainOptions(progress=False, log_fn=lambda m, s: logged.append((s, m))))
    evals = [h for h in result.history if "val_objective" in h]
    assert result.steps > 200 and len(evals) >= 8
    assert result.best_val["val_objective"] < evals[0]["val_objective"] - 0.05
    assert result.best_val["val_cvr_auc"] > 0.7
    assert result.n_types == N_TYPES and result.model.kind == "mmn"
    assert result.samples_per_sec > 0
    assert any("train_loss" in m for _, m in logged) and any("val_ctcvr_logloss" in m for _, m in logged)


def test_crash_and_resume_reproduce_the_uninterrupted_run(signal_cfg, tmp_path):
    opts = TrainOptions(progress=False, max_steps=50)
    reference = train(signal_cfg, DAYS, dataclasses.replace(opts, checkpoint_dir=tmp_path / "ref"))
    run = dataclasses.replace(opts, checkpoint_dir=tmp_path / "run")

    def crash(step: int) -> None:
        if step == 33:
            raise RuntimeError("injected crash")

    with pytest.raises(RuntimeError, match="injected crash"):
        train(signal_cfg, DAYS, dataclasses.replace(run, on_step=crash))
    resumed = train(signal_cfg, DAYS, run)
    assert resumed.resumed_from_step == 20 and resumed.steps == reference.steps == 50
    ref_state, got_state = reference.model.state_dict(), resumed.model.state_dict()
    for name, tensor in ref_state.items():
        assert torch.equal(tensor, got_state[name]), name
    assert resumed.best_step == reference.best_step
    # A finished run is not retrained; a different run ignores the checkpoint.
    again = train(signal_cfg, DAYS, run)
    assert again.resumed_from_step == 50
    other = train(signal_cfg, DAYS[:1], dataclasses.replace(run, max_steps=3))
    assert other.resumed_from_step is None and other.steps == 3


def test_non_finite_loss_names_the_step(signal_cfg, monkeypatch):
    import training.trainer as trainer_module

    built = []
    real_build = trainer_module.build_model
    monkeypatch.setattr(trainer_module, "build_model",
                        lambda *a, **k: built.append(real_build(*a, **k)) or built[-1])

    def poison(step: int) -> None:
        if step == 3:
            with torch.no_grad():
                for p in built[0].cvr_tower.parameters():
                    p.fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match="step 4"):
        train(signal_cfg, DAYS, TrainOptions(progress=False, on_step=poison))


def test_model_kind_can_pin_the_loss(signal_cfg, monkeypatch):
    """mmn_no_dynamic_weight trains on the plain-mean CTCVR loss whatever cfg.model says."""
    import training.distributed as distributed_module

    seen: list[bool] = []
    real = distributed_module.loss_from_config

    def spy(model_cfg, *args):
        seen.append(model_cfg.dynamic_weight)
        return real(model_cfg, *args)

    monkeypatch.setattr(distributed_module, "loss_from_config", spy)
    weighted = signal_cfg.with_overrides({"model.dynamic_weight": True})
    for kind in ("mmn", "mmn_no_dynamic_weight"):
        train(weighted, DAYS, TrainOptions(model_kind=kind, progress=False, max_steps=2))
    assert weighted.model.dynamic_weight is True
    assert seen == [True, True, False, False]


class _CountingLoss:
    """A minimal training.hooks.StepLoss plug-in: the plain loss, counted."""

    needs_impression_ids = False
    distributed = True

    def __init__(self, tag: str) -> None:
        self.tag, self.calls, self.bound = tag, 0, None

    def bind(self, model):
        self.bound = model.kind

    def loss(self, net, batch, loss_cfg):
        from training.losses import loss_from_config

        self.calls += 1
        p_ctr, p_cvr = net(batch["features"], batch["type_id"], batch["scenario_id"])
        return loss_from_config(loss_cfg, p_ctr, p_cvr, batch)

    def fingerprint(self):
        return {"tag": self.tag}

    def stats(self):
        return {"calls": float(self.calls)}


def test_a_step_loss_plugin_replaces_the_plain_loss_and_joins_the_fingerprint(signal_cfg, tmp_path):
    from training.hooks import StepLoss

    opts = TrainOptions(progress=False, max_steps=5, checkpoint_dir=tmp_path / "run")
    plain = train(signal_cfg, DAYS, dataclasses.replace(opts, checkpoint_dir=None))
    hook = _CountingLoss("a")
    assert isinstance(hook, StepLoss)
    got = train(signal_cfg, DAYS, dataclasses.replace(opts, step_loss=hook))
    assert hook.bound == "mmn" and got.step_loss_stats == {"calls": 5.0}
    for name, tensor in plain.model.state_dict().items():
        assert torch.equal(tensor, got.model.state_dict()[name]), name
    same = train(signal_cfg, DAYS, dataclasses.replace(opts, step_loss=_CountingLoss("a")))
    assert same.resumed_from_step == 5
    other = train(signal_cfg, DAYS, dataclasses.replace(opts, step_loss=_CountingLoss("b")))
    assert other.resumed_from_step is None and other.steps == 5


def test_a_changed_training_day_retrains_instead_of_resuming(signal_cfg, tmp_path, caplog):
    """Issue 17 item 3: the checkpoint fingerprint covers the training days' data (and the
    caller's extra inputs, e.g. the holdout day's manifest); a mismatch starts fresh, logged."""
    opts = TrainOptions(progress=False, max_steps=3, checkpoint_dir=tmp_path / "run",
                        inputs={"holdout": "manifest-a"})
    first = train(signal_cfg, DAYS, opts)
    assert first.resumed_from_step is None
    assert train(signal_cfg, DAYS, opts).resumed_from_step == 3
    samples, truth = make_day(signal_cfg, DAYS[0], 3000, N_TYPES, N_SCENARIOS, seed=7)
    write_day(signal_cfg, DAYS[0], samples, truth)
    with caplog.at_level("WARNING", logger="training.checkpoints"):
        changed = train(signal_cfg, DAYS, opts)
    assert changed.resumed_from_step is None and changed.steps == 3
    assert f"inputs.{DAYS[0]}" in caplog.text and "starts fresh" in caplog.text
    assert any(not torch.equal(t, changed.model.state_dict()[k]) for k, t in first.model.state_dict().items())
    caplog.clear()
    with caplog.at_level("WARNING", logger="training.checkpoints"):
        other = train(signal_cfg, DAYS, dataclasses.replace(opts, inputs={"holdout": "manifest-b"}))
    assert other.resumed_from_step is None and "inputs.holdout" in caplog.text


def test_keyword_options_still_work_with_a_deprecation_warning(signal_cfg):
    with pytest.warns(DeprecationWarning, match="TrainOptions"):
        result = train(signal_cfg, DAYS, progress=False, max_steps=2)
    assert result.steps == 2
