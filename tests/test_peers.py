"""The practitioner's peers: fitted on exactly the networks' training rows, scored alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.config import load_config
from mmn.model_kinds import PEER_KINDS
from simulation.synthetic import write_days
from training.data import SampleStream
from training.metrics import predict_rows
from training.peers import PEER_FITTERS, CrossEncoder, Rows, fit_peer
from training.trainer import DEFAULT_MAX_VAL_ROWS, slice_ranges

DAYS = ["2024-05-01", "2024-05-02"]
N_TYPES, N_SCENARIOS = 3, 2
SMALL_FEATURES = [
    {"name": "user_id", "kind": "categorical", "buckets": 300},
    {"name": "ad_id", "kind": "categorical", "buckets": 100},
    {"name": "user_age", "kind": "numeric", "boundaries": [18, 25, 35, 45, 55, 65]},
]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    tmp: Path = tmp_path_factory.mktemp("peers")
    cfg = load_config(overrides={
        "paths.lake_root": str(tmp / "lake"), "paths.truth_root": str(tmp / "truth"),
        "paths.reports_root": str(tmp / "reports"), "features": SMALL_FEATURES,
        "training.validation_fraction": 0.1, "training.read_batch_rows": 1000,
    })
    write_days(cfg, DAYS, n_rows=6000, n_types=N_TYPES, n_scenarios=N_SCENARIOS)
    return cfg


def test_peer_list_matches_the_fitters():
    assert set(PEER_KINDS) == set(PEER_FITTERS)


@pytest.mark.parametrize("kind", PEER_KINDS)
def test_peer_fits_the_trainers_rows_and_scores_through_the_evaluator(cfg, kind):
    peer = fit_peer(cfg, kind, DAYS[:1], n_types=N_TYPES, n_scenarios=N_SCENARIOS, split="train",
                    holdout_fraction=0.2)
    ranges = slice_ranges(cfg, DAYS[:1], "train", 0.2, DEFAULT_MAX_VAL_ROWS)
    trainer_rows = sum(len(c) for c in SampleStream(cfg, DAYS[:1], shuffle=False,
                                                   ranges=ranges.train).iter_chunks())
    holdout = predict_rows(peer, cfg, DAYS[:1], split="holdout", holdout_fraction=0.2)
    validation = sum(len(c) for c in SampleStream(cfg, DAYS[:1], shuffle=False,
                                                 ranges=ranges.validation).iter_chunks())
    assert peer.fit_info["train/rows"] == trainer_rows
    assert trainer_rows + validation + len(holdout) == 6000  # a partition of the day
    for column in ("p_ctr", "p_cvr", "p_ctcvr"):
        assert holdout[column].between(0, 1).all()
    clicked = holdout[holdout["click"] > 0]
    from training.metrics import auc

    assert auc(clicked["conversion"], clicked["p_cvr"]) > 0.55  # it learned something


def test_cross_encoder_one_hot_layout():
    enc = CrossEncoder((4, 3), n_types=2, n_scenarios=2)
    rows = Rows(features=np.array([[1, 2], [3, 0]]), type_id=np.array([0, 1]),
                scenario_id=np.array([1, 0]), click=np.zeros(2, np.int8), conversion=np.zeros(2, np.int8))
    matrix = enc.transform(rows).toarray()
    assert matrix.shape == (2, enc.width) == (2, 7 * 5 + 2 + 2 + 4)
    # fields 1, 4+2 | type crosses 7+0*2+0*4+1, 7+4*2+0*3+2 | scenario crosses 21+0+1*4+1,
    # 21+4*2+1*3+2 | type 35+0, scenario 35+2+1, (type, scenario) 35+4+0*2+1
    assert set(np.flatnonzero(matrix[0])) == {1, 6, 8, 17, 26, 34, 35, 38, 40}
    assert matrix[1, 7 + 0 * 2 + 1 * 4 + 3] == 1  # type 1's cross of field 0, id 3
    assert (matrix.sum(axis=0) <= 2).all() and (matrix.sum(axis=1) == 9).all()
    plain = CrossEncoder((4, 3), n_types=2, n_scenarios=2, crosses=False)
    assert plain.transform(rows).shape == (2, 7 + 2 + 2 + 4)
    assert set(np.flatnonzero(plain.transform(rows).toarray()[0])) == {1, 6, 7, 10, 12}
