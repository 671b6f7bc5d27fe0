"""The practitioner's peers: LightGBM and logistic regression with domain crosses.

They answer "would a simpler, standard model do?" for every comparison, so they are held
to the neural models' terms: fitted on exactly the rows the trainer trains on (the same
days, the same cold-start split and the same validation slice left out, see
:func:`training.trainer.slice_ranges`), using the validation slice the way the trainer
uses it (early stopping for LightGBM, the regularization strength for the regression),
and wrapped as a :class:`PeerModel` module so :func:`training.metrics.predict_rows` and the
evaluator score them on the same holdout rows as everything else.

Each peer fits two binary models: CVR on clicked rows (the population CVR is defined on)
and CTR on all rows, so p_ctcvr = p_ctr * p_cvr exists for the CTCVR metrics too.

- ``lightgbm``: every hashed field and the type and scenario ids as LightGBM categoricals.
- ``lr_crosses``: scikit-learn's LogisticRegression on one-hot fields, type, scenario and
  (type, scenario) indicators, plus type x field and scenario x field crosses: the linear
  model a practitioner would put beside per-domain networks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from scipy import sparse
from torch import nn

from core.config import PipelineConfig
from training.data import BucketRange, SampleStream

log = logging.getLogger(__name__)

READ_BATCH_ROWS = 65_536
LR_C_GRID = (0.03, 0.1, 0.3, 1.0)  # inverse L2 strength tried on the validation slice
LR_MAX_ITER = 300
LGB_PARAMS: dict[str, Any] = {
    "objective": "binary", "learning_rate": 0.05, "num_leaves": 63, "min_data_in_leaf": 40,
    "feature_fraction": 0.9, "cat_smooth": 10.0, "cat_l2": 10.0, "max_cat_to_onehot": 8,
    "metric": "auc", "verbosity": -1, "deterministic": True, "force_row_wise": True,
}
LGB_MAX_ROUNDS = 1000
LGB_EARLY_STOP = 30


@dataclass(frozen=True)
class Rows:
    """Samples as numpy: hashed feature ids [n, F], domain ids and labels [n]."""

    features: np.ndarray
    type_id: np.ndarray
    scenario_id: np.ndarray
    click: np.ndarray
    conversion: np.ndarray

    def __len__(self) -> int:
        return len(self.click)

    def take(self, mask: np.ndarray) -> Rows:
        return Rows(self.features[mask], self.type_id[mask], self.scenario_id[mask],
                    self.click[mask], self.conversion[mask])


def read_rows(cfg: PipelineConfig, days: Sequence[str], ranges: Sequence[BucketRange]) -> Rows:
    """The rows of ``days`` kept by ``ranges`` (the trainer's own reader, unshuffled)."""
    stream = SampleStream(cfg, days, batch_size=READ_BATCH_ROWS, shuffle=False, ranges=ranges)
    parts = [chunk.ints for chunk in stream.iter_chunks()]
    if not parts:
        raise ValueError(f"no rows in days {list(days)} for the peers to fit")
    ints = np.concatenate(parts)
    f = len(cfg.features)
    return Rows(features=ints[:, :f].astype(np.int64), type_id=ints[:, f].astype(np.int64),
                scenario_id=ints[:, f + 1].astype(np.int64), click=ints[:, f + 2].astype(np.int8),
                conversion=ints[:, f + 3].astype(np.int8))


class BinaryScorer(Protocol):
    def predict(self, rows: Rows) -> np.ndarray: ...


# ----------------------------------------------------------------- logistic regression


@dataclass(frozen=True)
class CrossEncoder:
    """One-hot fields and domain indicators, plus (``crosses``) type x field and scenario x
    field crosses, as a sparse matrix: column blocks [fields | type crosses | scenario
    crosses | type | scenario | type x scenario]."""

    cardinalities: tuple[int, ...]
    n_types: int
    n_scenarios: int
    crosses: bool = True

    @property
    def _total(self) -> int:
        return sum(self.cardinalities)

    @property
    def width(self) -> int:
        blocks = 1 + (self.n_types + self.n_scenarios if self.crosses else 0)
        return self._total * blocks + self.n_types + self.n_scenarios + self.n_types * self.n_scenarios

    def transform(self, rows: Rows) -> sparse.csr_matrix:
        card = np.asarray(self.cardinalities, dtype=np.int64)
        start = np.concatenate([[0], np.cumsum(card)[:-1]])
        ids = np.clip(rows.features, 0, card - 1)
        t, s = rows.type_id[:, None], rows.scenario_id[:, None]
        total, nt, ns = self._total, self.n_types, self.n_scenarios
        blocks = [start + ids]
        if self.crosses:
            blocks += [total + start * nt + t * card + ids,
                       total * (1 + nt) + start * ns + s * card + ids]
        base = total * (1 + (nt + ns if self.crosses else 0))
        blocks += [base + t, base + nt + s, base + nt + ns + t * ns + s]
        cols = np.concatenate(blocks, axis=1)
        n, k = cols.shape
        data = np.ones(n * k, dtype=np.float32)
        indptr = np.arange(0, n * k + 1, k, dtype=np.int64)
        return sparse.csr_matrix((data, cols.ravel(), indptr), shape=(n, self.width))


@dataclass
class LogisticScorer:
    """A fitted LogisticRegression on an encoding."""

    encoder: CrossEncoder
    model: Any

    def predict(self, rows: Rows) -> np.ndarray:
        return self.model.predict_proba(self.encoder.transform(rows))[:, 1]


def fit_lr_crosses(encoder: CrossEncoder, train: Rows, val: Rows | None) -> tuple[BinaryScorer, BinaryScorer, dict]:
    """CVR on clicked rows: the L2 strength picked on the validation slice's clicked rows
    (the grid in ascending C, each fit warm-started from the last: one path, not four cold
    fits). CTR on all rows: one-hot fields and domain indicators without the crosses, at the
    chosen C (it only supplies p_ctr for the CTCVR metrics; the crosses on every impression
    cost minutes and are not what the comparison is about)."""
    import copy

    from sklearn.linear_model import LogisticRegression

    from training.metrics import auc

    clicked = train.take(train.click > 0)
    x_clicked = encoder.transform(clicked)
    val_clicked = val.take(val.click > 0) if val is not None else None
    model = LogisticRegression(C=LR_C_GRID[-1], solver="lbfgs", max_iter=LR_MAX_ITER, warm_start=True)
    best, best_c, best_auc, scores = None, LR_C_GRID[-1], -1.0, {}
    if val_clicked is not None and len(val_clicked) and val_clicked.conversion.any():
        x_val = encoder.transform(val_clicked)
        for c in sorted(LR_C_GRID):
            model.set_params(C=c).fit(x_clicked, clicked.conversion)
            value = auc(val_clicked.conversion, model.predict_proba(x_val)[:, 1])
            scores[c] = value
            if value is not None and value > best_auc:
                best, best_c, best_auc = copy.deepcopy(model), c, value
    if best is None:
        best = model.set_params(C=best_c).fit(x_clicked, clicked.conversion)
    ctr_encoder = CrossEncoder(encoder.cardinalities, encoder.n_types, encoder.n_scenarios, crosses=False)
    ctr = LogisticRegression(C=best_c, solver="lbfgs", max_iter=LR_MAX_ITER)
    ctr.fit(ctr_encoder.transform(train), train.click)
    info = {"peer/C": best_c, **{f"peer/val_cvr_auc_C{c}": v for c, v in scores.items() if v is not None}}
    return LogisticScorer(ctr_encoder, ctr), LogisticScorer(encoder, best), info


# --------------------------------------------------------------------------- LightGBM


@dataclass
class BoosterScorer:
    """A fitted LightGBM booster on [fields..., type_id, scenario_id] as categoricals."""

    booster: Any

    def predict(self, rows: Rows) -> np.ndarray:
        return self.booster.predict(_lgb_matrix(rows), num_threads=self.booster.params.get("num_threads", 1))


def _lgb_matrix(rows: Rows) -> np.ndarray:
    return np.column_stack([rows.features, rows.type_id, rows.scenario_id]).astype(np.int32)


def _fit_booster(train: Rows, labels: np.ndarray, val: Rows | None, val_labels: np.ndarray | None,
                 seed: int, threads: int) -> tuple[BoosterScorer, int]:
    import lightgbm as lgb

    categorical = list(range(train.features.shape[1] + 2))
    params = {**LGB_PARAMS, "seed": seed, "num_threads": threads}
    data = lgb.Dataset(_lgb_matrix(train), labels, categorical_feature=categorical, free_raw_data=True)
    sets, callbacks = [], []
    if val is not None and val_labels is not None and len(np.unique(val_labels)) == 2:
        sets = [lgb.Dataset(_lgb_matrix(val), val_labels, reference=data, categorical_feature=categorical)]
        callbacks = [lgb.early_stopping(LGB_EARLY_STOP, verbose=False)]
    booster = lgb.train(params, data, num_boost_round=LGB_MAX_ROUNDS if sets else 200,
                        valid_sets=sets, callbacks=callbacks)
    return BoosterScorer(booster), int(booster.best_iteration or booster.current_iteration())


def fit_lightgbm(train: Rows, val: Rows | None, seed: int, threads: int) -> tuple[BinaryScorer, BinaryScorer, dict]:
    """CVR on clicked rows and CTR on all rows, each early-stopped on the validation slice."""
    clicked = train.take(train.click > 0)
    val_clicked = val.take(val.click > 0) if val is not None else None
    cvr, cvr_rounds = _fit_booster(clicked, clicked.conversion, val_clicked,
                                   None if val_clicked is None else val_clicked.conversion, seed, threads)
    ctr, ctr_rounds = _fit_booster(train, train.click, val, None if val is None else val.click,
                                   seed, threads)
    return ctr, cvr, {"peer/cvr_rounds": cvr_rounds, "peer/ctr_rounds": ctr_rounds}


# ------------------------------------------------------------------------ the module


def _lightgbm(cfg: PipelineConfig, train: Rows, val: Rows | None, n_types: int, n_scenarios: int,
              threads: int) -> tuple[BinaryScorer, BinaryScorer, dict]:
    return fit_lightgbm(train, val, cfg.training.seed, threads)


def _lr_crosses(cfg: PipelineConfig, train: Rows, val: Rows | None, n_types: int, n_scenarios: int,
                threads: int) -> tuple[BinaryScorer, BinaryScorer, dict]:
    encoder = CrossEncoder(tuple(f.cardinality for f in cfg.features), n_types, n_scenarios)
    return fit_lr_crosses(encoder, train, val)


# Peer kind -> fitter; mmn/model_kinds.py lists the same names torch-free (tests check).
PEER_FITTERS: dict[str, Callable[..., tuple[BinaryScorer, BinaryScorer, dict]]] = {
    "lightgbm": _lightgbm,
    "lr_crosses": _lr_crosses,
}


class PeerModel(nn.Module):
    """A fitted peer behind the zoo models' call signature: (features, type_id, scenario_id)
    -> (p_ctr, p_cvr), so the evaluator scores it exactly as it scores a network."""

    def __init__(self, kind: str, ctr: BinaryScorer, cvr: BinaryScorer, n_types: int,
                 n_scenarios: int, fit_info: dict[str, float]) -> None:
        super().__init__()
        self.kind, self.ctr, self.cvr = kind, ctr, cvr
        self.n_types, self.n_scenarios = n_types, n_scenarios
        self.fit_info = fit_info
        # predict_rows reads the device off the first parameter; a peer lives on the CPU.
        self.device_anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    def forward(self, features: torch.Tensor, type_id: torch.Tensor,
                scenario_id: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = features.shape[0]
        rows = Rows(features.cpu().numpy(), type_id.cpu().numpy(), scenario_id.cpu().numpy(),
                    np.zeros(n, np.int8), np.zeros(n, np.int8))
        p_ctr = torch.from_numpy(np.asarray(self.ctr.predict(rows), dtype=np.float32))
        p_cvr = torch.from_numpy(np.asarray(self.cvr.predict(rows), dtype=np.float32))
        return p_ctr, p_cvr


def fit_peer(cfg: PipelineConfig, kind: str, train_days: Sequence[str], *, n_types: int,
             n_scenarios: int, split: str | None = None, holdout_fraction: float | None = None,
             threads: int = 1) -> PeerModel:
    """Fit ``kind`` on the trainer's training rows of ``train_days``, tuned on its slice."""
    from training.trainer import DEFAULT_MAX_VAL_ROWS, slice_ranges

    if kind not in PEER_FITTERS:
        raise ValueError(f"unknown peer kind {kind!r}; peers: {sorted(PEER_FITTERS)}")
    started = time.perf_counter()
    ranges = slice_ranges(cfg, train_days, split, holdout_fraction, DEFAULT_MAX_VAL_ROWS)
    train = read_rows(cfg, train_days, ranges.train)
    val = read_rows(cfg, train_days, ranges.validation) if ranges.validation else None
    ctr, cvr, info = PEER_FITTERS[kind](cfg, train, val, n_types, n_scenarios, threads)
    seconds = time.perf_counter() - started
    info = {**info, "train/rows": float(len(train)), "train/seconds": seconds,
            "train/samples_per_sec": len(train) / max(seconds, 1e-9)}
    log.info("%s fitted on %d rows in %.1f s", kind, len(train), seconds)
    return PeerModel(kind, ctr, cvr, n_types, n_scenarios, info)
