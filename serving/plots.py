"""Per-domain AUC charts logged to MLflow: where a person would rather look than read.

Per conversion type and per display scenario CVR AUC as bar charts, and the type x
scenario CVR AUC as a heatmap (blank cells: the domain had no clicks or a single class).
"""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib

matplotlib.use("Agg")  # headless: Airflow workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def axis_bars(metrics: Mapping[str, float | None], axis: str, names: list[str]) -> plt.Figure:
    """Bar chart of ``cvr_auc_<axis>/<name>``; undefined AUCs are marked, not faked."""
    values = [metrics.get(f"cvr_auc_{axis}/{n}") for n in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(names)), 4.0))
    heights = [v if v is not None else 0.0 for v in values]
    colors = ["tab:blue" if v is not None else "lightgrey" for v in values]
    ax.bar(range(len(names)), heights, color=colors)
    for i, v in enumerate(values):
        if v is None:
            ax.text(i, 0.02, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
    avg = metrics.get(f"cvr_auc_{axis}_avg")
    if avg is not None:
        ax.axhline(avg, color="tab:red", linestyle="--", linewidth=1, label=f"average {avg:.3f}")
        ax.legend(loc="lower right")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("CVR AUC (clicked impressions)")
    ax.set_title(f"Holdout CVR AUC per {'conversion type' if axis == 'type' else 'display scenario'}")
    fig.tight_layout()
    return fig


def domain_heatmap(table: pd.DataFrame, types: list[str], scenarios: list[str]) -> plt.Figure:
    """Type x scenario CVR AUC heatmap from a per-domain table (type, scenario, cvr_auc)."""
    grid = np.full((len(types), len(scenarios)), np.nan)
    t_index = {t: i for i, t in enumerate(types)}
    s_index = {s: j for j, s in enumerate(scenarios)}
    for row in table.itertuples(index=False):
        if row.cvr_auc is not None and not pd.isna(row.cvr_auc):
            grid[t_index[row.type], s_index[row.scenario]] = row.cvr_auc
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(scenarios) + 2), max(4.0, 0.35 * len(types) + 1.5)))
    image = ax.imshow(np.ma.masked_invalid(grid), vmin=0.5, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(scenarios)), scenarios, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(types)), types, fontsize=8)
    ax.set_xlabel("display scenario")
    ax.set_ylabel("conversion type")
    ax.set_title("Holdout CVR AUC per domain (blank: undefined)")
    fig.colorbar(image, ax=ax, label="CVR AUC")
    fig.tight_layout()
    return fig


def log_domain_plots(
    metrics: Mapping[str, float | None], table: pd.DataFrame, *, types: list[str], scenarios: list[str]
) -> None:
    """Log the three charts to the active MLflow run under ``plots/``."""
    import mlflow

    figures = {
        "plots/cvr_auc_per_type.png": axis_bars(metrics, "type", types),
        "plots/cvr_auc_per_scenario.png": axis_bars(metrics, "scenario", scenarios),
        "plots/cvr_auc_type_x_scenario.png": domain_heatmap(table, types, scenarios),
    }
    for path, fig in figures.items():
        mlflow.log_figure(fig, path)
        plt.close(fig)
