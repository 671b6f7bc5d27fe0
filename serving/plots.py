"""Per-domain AUC charts logged to MLflow: where a person would rather look than read.

Per conversion type and per display scenario CVR AUC as bar charts, each bar labelled with
its holdout conversions (an AUC over a handful of conversions is noise, not a regression) and
the champion's value on the same holdout overlaid; the type x scenario CVR AUC as a heatmap
with each cell's conversions (blank cells: the domain had no clicks or a single class).
"""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib

matplotlib.use("Agg")  # headless: Airflow workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def axis_bars(metrics: Mapping[str, float | None], axis: str, names: list[str],
              champion: Mapping[str, float | None] | None = None,
              champion_label: str = "champion") -> plt.Figure:
    """Bar chart of ``cvr_auc_<axis>/<name>``, each bar labelled with its holdout conversions
    (``n_conversions_<axis>/<name>``) and the champion's value as a black tick; undefined AUCs
    are marked, not faked."""
    values = [metrics.get(f"cvr_auc_{axis}/{n}") for n in names]
    conversions = [metrics.get(f"n_conversions_{axis}/{n}") for n in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(names)), 4.5))
    heights = [v if v is not None else 0.0 for v in values]
    colors = ["tab:blue" if v is not None else "lightgrey" for v in values]
    ax.bar(range(len(names)), heights, color=colors, label="challenger")
    for i, (v, n) in enumerate(zip(values, conversions, strict=True)):
        count = "0" if n is None else f"{int(n)}"
        if v is None:
            ax.text(i, 0.02, f"n/a · {count} conv", ha="center", va="bottom", fontsize=7, rotation=90)
        else:
            ax.text(i, v + 0.01, count, ha="center", va="bottom", fontsize=7)
    if champion:
        theirs = [champion.get(f"cvr_auc_{axis}/{n}") for n in names]
        xs = [i for i, v in enumerate(theirs) if v is not None]
        ax.scatter(xs, [theirs[i] for i in xs], marker="_", s=300, linewidths=2, color="black",
                   zorder=3, label=champion_label)
    avg = metrics.get(f"cvr_auc_{axis}_avg")
    if avg is not None:
        ax.axhline(avg, color="tab:red", linestyle="--", linewidth=1, label=f"average {avg:.3f}")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0.0, 1.05)
    ax.set_ylabel("CVR AUC (clicked impressions)")
    what = "conversion type" if axis == "type" else "display scenario"
    ax.set_title(f"Holdout CVR AUC per {what} (numbers: holdout conversions)")
    fig.tight_layout()
    return fig


def domain_heatmap(table: pd.DataFrame, types: list[str], scenarios: list[str]) -> plt.Figure:
    """Type x scenario CVR AUC heatmap from a per-domain table (type, scenario, cvr_auc,
    n_conversions), each cell labelled with its holdout conversions."""
    grid = np.full((len(types), len(scenarios)), np.nan)
    counts: dict[tuple[int, int], int] = {}
    t_index = {t: i for i, t in enumerate(types)}
    s_index = {s: j for j, s in enumerate(scenarios)}
    for row in table.to_dict(orient="records"):
        cell = t_index[row["type"]], s_index[row["scenario"]]
        if row.get("n_conversions") is not None:
            counts[cell] = int(row["n_conversions"])
        if row["cvr_auc"] is not None and not pd.isna(row["cvr_auc"]):
            grid[cell] = row["cvr_auc"]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(scenarios) + 2), max(4.0, 0.4 * len(types) + 1.5)))
    image = ax.imshow(np.ma.masked_invalid(grid), vmin=0.5, vmax=1.0, cmap="viridis", aspect="auto")
    for (i, j), n in counts.items():
        ax.text(j, i, str(n), ha="center", va="center", fontsize=6,
                color="white" if not np.isnan(grid[i, j]) and grid[i, j] < 0.75 else "black")
    ax.set_xticks(range(len(scenarios)), scenarios, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(types)), types, fontsize=8)
    ax.set_xlabel("display scenario")
    ax.set_ylabel("conversion type")
    ax.set_title("Holdout CVR AUC per domain (numbers: conversions; blank: undefined)")
    fig.colorbar(image, ax=ax, label="CVR AUC")
    fig.tight_layout()
    return fig


def log_domain_plots(
    metrics: Mapping[str, float | None], table: pd.DataFrame, *, types: list[str], scenarios: list[str],
    champion: Mapping[str, float | None] | None = None, champion_label: str | None = None,
) -> None:
    """Log the three charts to the active MLflow run under ``plots/`` (the champion's
    per-type and per-scenario values overlaid when given)."""
    import mlflow

    label = champion_label or "champion"
    figures = {
        "plots/cvr_auc_per_type.png": axis_bars(metrics, "type", types, champion, label),
        "plots/cvr_auc_per_scenario.png": axis_bars(metrics, "scenario", scenarios, champion, label),
        "plots/cvr_auc_type_x_scenario.png": domain_heatmap(table, types, scenarios),
    }
    for path, fig in figures.items():
        mlflow.log_figure(fig, path)
        plt.close(fig)
