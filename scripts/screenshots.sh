#!/usr/bin/env bash
# Screenshots of what a user sees after `make demo` (issue 18): the MLflow runs table, the
# latest run, the registered model, and the Airflow grid of mmn_daily_retrain. Headless
# Chromium (Debian's `chromium` package: apt-get install chromium) against the project's
# own stores; the MLflow UI and the Airflow api-server are started on loopback ports for the
# shots and stopped afterwards. Usage: scripts/screenshots.sh [OUT_DIR]  (default docs/img)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-docs/img}
BIN=.venv/bin
CHROME=$(command -v chromium || command -v chromium-browser || true)
[ -n "$CHROME" ] || { echo "needs Chromium: apt-get install chromium" >&2; exit 1; }
[ -x "$BIN/mmn" ] || { echo "run 'make demo' first (no .venv)" >&2; exit 1; }
MLFLOW_PORT=${MLFLOW_PORT:-5055}
AIRFLOW_PORT=${AIRFLOW_PORT:-8085}
WAIT_MS=${WAIT_MS:-20000}   # virtual time the page's scripts get before the shot
mkdir -p "$OUT"
LOGS=$(mktemp -d)
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

wait_for() {  # URL, name: poll until it answers (3 minutes at most)
  for _ in $(seq 180); do curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 1; done
  echo "$2 did not come up; its log: $LOGS" >&2; exit 1
}

shot() {  # FILE URL [WIDTH,HEIGHT]
  "$CHROME" --headless --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir="$LOGS/chrome" \
    --window-size="${3:-1600,1000}" --virtual-time-budget="$WAIT_MS" \
    --screenshot="$OUT/$1" "$2" >>"$LOGS/chrome.log" 2>&1
  echo "  $OUT/$1  <- $2"
}

"$BIN/mmn" mlflow-ui --port "$MLFLOW_PORT" >"$LOGS/mlflow.log" 2>&1 & PIDS+=($!)
# No login page in the shots: the simple auth manager treats every user as admin here only.
AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=True \
  "$BIN/mmn" airflow --port "$AIRFLOW_PORT" api-server >"$LOGS/airflow.log" 2>&1 & PIDS+=($!)
wait_for "http://127.0.0.1:$MLFLOW_PORT/health" "the MLflow UI"
wait_for "http://127.0.0.1:$AIRFLOW_PORT/api/v2/monitor/health" "the Airflow api-server"

# The experiment, the latest daily run, the registered model and the latest DAG run.
read -r EXP RUN MODEL DAGRUN < <("$BIN/python" - 2>/dev/null <<'PY'
from mlflow import MlflowClient
from core.config import load_config
from mmn.airflow_env import apply
from mmn.tracking import setup_mlflow
cfg = load_config()
apply(cfg)
from airflow.models.dagrun import DagRun
from airflow.utils.session import create_session
from sqlalchemy import select
with create_session() as session:
    dagrun = session.scalar(select(DagRun.run_id).where(DagRun.dag_id == "mmn_daily_retrain")
                            .order_by(DagRun.start_date.desc()).limit(1))
setup_mlflow(cfg)
client = MlflowClient()
exp = client.get_experiment_by_name(cfg.mlflow.experiment)
runs = client.search_runs([exp.experiment_id], "tags.`gate.decision` != ''", order_by=["start_time DESC"], max_results=1)
if not runs:
    raise SystemExit("no gated daily run in the MLflow store: run `make demo` first")
print(exp.experiment_id, runs[0].info.run_id, cfg.mlflow.registered_model, dagrun or "none")
PY
)
M="http://127.0.0.1:$MLFLOW_PORT"
shot mlflow_runs_table.png "$M/#/experiments/$EXP/runs"
shot mlflow_run.png "$M/#/experiments/$EXP/runs/$RUN"
shot mlflow_registry.png "$M/#/models/$MODEL"
A="http://127.0.0.1:$AIRFLOW_PORT/dags/mmn_daily_retrain"
shot airflow_grid.png "$A"
if [ "$DAGRUN" != none ]; then
  shot airflow_run.png "$A/runs/$DAGRUN"
  shot airflow_gate_log.png "$A/runs/$DAGRUN/tasks/gate_and_promote"
fi
echo "screenshots in $OUT (server logs: $LOGS)"
