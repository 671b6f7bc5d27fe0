"""SSIM, scenario-shared instance modeling (Liu et al., KDD'25), as an optional training stage.

Why: a data-poor display scenario trains its CVR tower on few rows. SSIM learns, for every
instance and every *other* scenario s' of the same conversion type, whether the instance is
also worth training on in domain (t, s'). The selected ("shared") instances then add their
CTCVR loss in the target towers. The selection is learned once (search phase), saved, and
reused by any model: routing an instance to another domain is just
``forward(features, type_id, scenario_id=s')``, so every zoo model with per-domain routing
(MMN's composed towers, STAR, MMoE/PLE, DPG...) and the DNN (domain ids as inputs) can use it.

Search phase (:func:`search`): a selection network (an MLP over the instance's backbone
embedding, one head per target) is trained jointly with a backbone (MMN by default). For a
mini-batch of N rows with home domains d_i = (t_i, s_i) and eligible targets k in K_i
(the scenarios s' != s_i of type t_i; every domain != d_i with ``across_types``)::

    L = L_backbone(every row in its home domain)              (CTR + alpha * CTCVR, as trained)
      + alpha * beta / N * sum_i sum_{k in K_i} g_ik * w_i * BCE(p_ctr(x_i; k) * p_cvr(x_i; k), y_i)
      + lambda * w_bar / N * sum_i sum_{k in K_i} KL(Bern(rho) || Bern(sigmoid(z_ik)))

* ``g_ik = STE(ReLU(sigmoid(z_ik) - epsilon))``: forward the hard mask 1[sigmoid(z_ik) > epsilon],
  backward the straight-through gradient of ``ReLU(sigmoid(z) - epsilon)``, i.e.
  ``dg/dz = sigmoid'(z)`` for selected pairs and 0 otherwise (unselected pairs are moved by
  the mask term alone, so their target-tower forward is skipped: it would get no gradient).
* ``w_i = N / N_c(d_i)`` with ``model.dynamic_weight`` (the row's home weight, so a home
  domain sharing a fraction r of its rows adds r times its mean loss to the target), else 1;
  ``w_bar = mean_i w_i`` (= the number of domains in the batch; 1 without dynamic weights).
* Mask term, the KL(1 || G) of the method: with ``rho = target_share = 1`` (default) it is
  exactly ``-lambda * w_bar * (1/N) * sum_i sum_k log sigmoid(z_ik)``; it keeps the selection
  from collapsing to none (the shared loss alone only ever pushes gates down). ``w_bar`` puts
  it on the scale of the weighted shared loss, so lambda does not depend on how many domains
  a batch holds. With rho = 1 a pair's gradient is ``(1 - s) * (c * s - lambda)`` with
  ``s = sigmoid(z)``, ``c = alpha * beta * (w_i / w_bar) * BCE``: it settles at ``s = lambda / c``
  and stays selected while ``c < lambda / epsilon``. So a larger epsilon selects fewer, a
  larger lambda more, and rows of domains bigger than average (w_i < w_bar) are cheaper to
  share: sharing flows from data-rich to data-poor scenarios. With rho < 1 each gate is
  pulled towards rho (lambda then selects more only while rho > epsilon).

The search's final selector scores every eligible (instance, target) pair of the training
rows (validation slice and holdout excluded); ``shared = score > epsilon``. The pairs are
saved as Parquet with a manifest under ``<lake_root>/ssim/<set_id>/`` (:func:`load_shared_set`).

Reuse phase: ``train(cfg, days, TrainOptions(step_loss=shared_training(cfg, set, ratio)))``
(:class:`SharedTraining`, a ``training.hooks.StepLoss`` plug-in) looks up each batch's
impression ids in the set and runs the selected pairs as extra rows routed to their target
domains, adding the same shared term (g = 1). ``ratio=None`` uses the search's own
selection (the ``shared`` flag); a ratio r takes, per target domain, the top
``floor(r * candidates)`` pairs by score. :func:`choose_ratio` picks r on the trainer's
validation slice. Without a set, or with no selected pair in a batch, a step is exactly the
plain one.

Impression ids are only unique within a day (docs/contracts.md), and batches carry no day:
a window whose days share an impression id is refused rather than silently mis-shared.

Package layout (one seam per module): ``losses`` (targets, gate, mask term, selector, the
joint search objective), ``store`` (saved sets), ``search`` (search phase), ``reuse`` (the
trainer plug-in), ``ratio`` (ratio choice), ``daily`` (one pipeline day). The settings are
``cfg.ssim`` (core.config.Ssim). The trainer never imports this package.
"""

from __future__ import annotations

from training.ssim.daily import run_search_for_day
from training.ssim.losses import (
    JointSearch,
    Selector,
    Targets,
    home_weight,
    mask_kl,
    shared_ctcvr_loss,
    ste_gate,
    with_extra_rows,
)
from training.ssim.ratio import RatioRun, best_ratio, choose_ratio, ratio_sweep, ratio_table, slice_metrics
from training.ssim.reuse import SharedTraining, shared_training
from training.ssim.search import score_pairs, search
from training.ssim.store import (
    MANIFEST_FILE,
    PAIRS_FILE,
    PAIRS_SCHEMA,
    SSIM_DIR,
    SharedSet,
    domain_names,
    list_shared_sets,
    load_shared_set,
    record_choice,
    save_shared_set,
    selection_stats,
    ssim_root,
)

__all__ = [
    "MANIFEST_FILE", "PAIRS_FILE", "PAIRS_SCHEMA", "SSIM_DIR", "JointSearch", "RatioRun",
    "Selector", "SharedSet", "SharedTraining", "Targets", "best_ratio", "choose_ratio",
    "domain_names", "home_weight", "list_shared_sets", "load_shared_set", "mask_kl",
    "ratio_sweep", "ratio_table", "record_choice", "run_search_for_day", "save_shared_set",
    "score_pairs", "search", "selection_stats", "shared_ctcvr_loss", "shared_training",
    "slice_metrics", "ssim_root", "ste_gate", "with_extra_rows",
]
