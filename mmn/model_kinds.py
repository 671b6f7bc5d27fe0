"""Names of the model kinds the trainer can build (the model zoo's keys), and the peers.

The zoo's keys live in core.contracts (the config checks ``model.kind`` against them at
load, and core must not import mmn); they are re-exported here so DAG params and the CLI
can list them without importing torch. tests/test_baselines.py checks the zoo registers
exactly these.
"""

from core.contracts import MODEL_KINDS

__all__ = ["COMPARISON_KINDS", "MODEL_KINDS", "PEER_KINDS"]

# The practitioner's peers (training/peers.py): comparison rows fitted on the same rows as
# the networks, not zoo networks; tests/test_peers.py checks the fitters match this list.
PEER_KINDS: tuple[str, ...] = ("lightgbm", "lr_crosses")
COMPARISON_KINDS: tuple[str, ...] = (*MODEL_KINDS, *PEER_KINDS)
