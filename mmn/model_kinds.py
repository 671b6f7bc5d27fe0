"""Names of the model kinds the trainer can build (the model zoo's keys).

Kept apart from training.models so DAG params can list them without importing torch;
tests/test_model_zoo.py checks the zoo registers exactly these.
"""

MODEL_KINDS: tuple[str, ...] = (
    "mmn", "mmn_paper", "mmn_common_only", "mmn_no_dynamic_weight", "dnn",
    # Baselines of the MMN paper's comparison (mmn/compare.py).
    "esmm", "mmoe_type", "mmoe_scen", "ple_type", "ple_scen", "mt_fwfm", "star",
    "dpg_full", "dpg_rowcol", "dpg_row", "dpg_col", "mi_dpg",
)

# The practitioner's peers (training/peers.py): comparison rows fitted on the same rows as
# the networks, not zoo networks; tests/test_peers.py checks the fitters match this list.
PEER_KINDS: tuple[str, ...] = ("lightgbm", "lr_crosses")
COMPARISON_KINDS: tuple[str, ...] = (*MODEL_KINDS, *PEER_KINDS)
