"""`mmn <stage>`: every pipeline stage runnable alone, plus the operational commands.

Stages (build, validate, train, evaluate, gate, run-day) call the same functions as the
DAG tasks (mmn.tasks), so a stage run by hand behaves exactly as it does under Airflow.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

# Only light imports up here: `mmn <stage> --help` must not pay for torch, pyspark, GX,
# MLflow or pandas (tests/test_cli_help.py checks it); each command imports what it needs.
from core.config import SSIM_MODES, PipelineConfig, add_config_arguments, load_config
from mmn.model_kinds import MODEL_KINDS
from mmn.processes import ProcessTree, http_ok

LOOPBACK = "127.0.0.1"
# Choices of the pass-through commands' options, kept here so their --help needs no heavy
# import; tests/test_cli_help.py checks them against the modules that own them.
GENERATOR_PRESETS = ("criteo", "multidomain", "newsfeed")
LOG_FORMATS = ("jsonl", "jsonl.gz", "parquet")
VALIDATION_ENGINES = ("pandas", "spark")


def _config_parent() -> argparse.ArgumentParser:
    return add_config_arguments(argparse.ArgumentParser(add_help=False))


def _cfg(args: argparse.Namespace) -> PipelineConfig:
    return load_config(args.config, overrides=args.overrides)


def _print(obj: object) -> None:
    print(json.dumps(obj, indent=1, default=str))


def _day(text: str) -> str:
    try:
        return dt.date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a YYYY-MM-DD day: {text!r}") from None


def venv_tool(name: str) -> str:
    """The console script ``name`` next to this interpreter (the venv's bin/), else on PATH.

    `make` runs .venv/bin/mmn without activating the venv, so a bare ``mlflow`` or
    ``airflow`` would not resolve; the tool installed with this interpreter always does."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(f"{name!r} is neither next to {sys.executable} nor on PATH: run `make venv`")


# ---------------------------------------------------------------- server commands


def _warn_if_exposed(what: str, host: str) -> None:
    if host not in (LOOPBACK, "localhost", "::1"):
        print(f"mmn: warning: {what} listens on {host}, reachable from other machines; it has no "
              "authentication in this mode", file=sys.stderr)


def _serve_env(cfg: PipelineConfig) -> dict[str, str]:
    """Environment of the model server: the store, and the serving settings of the effective
    config (serving.max_request_records, serving.tower_cache_mb, read by serving.pyfunc at load)."""
    from serving.pyfunc import MAX_RECORDS_ENV, TOWER_CACHE_ENV

    env = {**os.environ, "MLFLOW_TRACKING_URI": cfg.mlflow.tracking_uri}
    serving = cfg.raw.get("serving") or {}
    for key, name in (("max_request_records", MAX_RECORDS_ENV), ("tower_cache_mb", TOWER_CACHE_ENV)):
        if serving.get(key) is not None:
            env[name] = str(serving[key])
    return env


def _require_alias(cfg: PipelineConfig, alias: str) -> str:
    """The version behind ``alias``; a clear error (not a server stack trace) when there is none."""
    uri = cfg.mlflow.tracking_uri
    name = cfg.mlflow.registered_model
    hint = "train and promote one first: `make demo`, or `mmn run-day --day YYYY-MM-DD`"
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise RuntimeError(f"no MLflow store at {uri}, so no model {name}@{alias} to serve: {hint}")
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        version = MlflowClient(uri, uri).get_model_version_by_alias(name, alias)
    except MlflowException:
        raise RuntimeError(f"no version of registered model {name!r} has the alias {alias!r} in {uri}: "
                           f"{hint}") from None
    return str(version.version)


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _cfg(args)
    version = _require_alias(cfg, args.alias)
    uri = f"models:/{cfg.mlflow.registered_model}@{args.alias}"
    argv = [venv_tool("mlflow"), "models", "serve", "-m", uri, "--env-manager", "local",
            "--host", args.host, "--port", str(args.port), "--workers", str(args.workers)]
    _warn_if_exposed("the model server", args.host)
    print(f"serving {uri} (version {version}) on http://{args.host}:{args.port}/invocations "
          f"(health: /ping; Ctrl-C to stop)", flush=True)
    tree = ProcessTree()
    tree.start("mlflow models serve", argv, _serve_env(cfg))
    return tree.wait()


def cmd_mlflow_ui(args: argparse.Namespace) -> int:
    cfg = _cfg(args)
    argv = [venv_tool("mlflow"), "ui", "--backend-store-uri", cfg.mlflow.tracking_uri,
            "--host", args.host, "--port", str(args.port), "--workers", str(args.workers)]
    # The job consumers serve GenAI evaluation jobs this project never runs: they cost a
    # process per job type and outlived SIGTERM.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    _warn_if_exposed("the MLflow UI", args.host)
    print(f"MLflow UI on http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    tree = ProcessTree()
    tree.start("mlflow ui", argv, env)
    return tree.wait()


def cmd_airflow(args: argparse.Namespace) -> int:
    from mmn.airflow_env import SERVES_LOGS, apply

    env = apply(_cfg(args), host=args.host, port=args.port)
    airflow_args = list(args.airflow_args)
    if airflow_args[:1] == ["standalone"]:
        return _airflow_standalone(env, airflow_args[1:])
    if airflow_args[:1] and airflow_args[0] in SERVES_LOGS and not {"-s", "--skip-serve-logs"} & set(airflow_args):
        # Its log server would listen on every interface; here the UI reads the log files.
        airflow_args.append("--skip-serve-logs")
    argv = [venv_tool("airflow"), *airflow_args]
    os.execv(argv[0], argv)
    return 0  # unreachable


def _airflow_standalone(env: Mapping[str, str], extra: Sequence[str]) -> int:
    """`airflow standalone`, the embedded way: the same four components on the project's
    SQLite DB, with the api-server on 127.0.0.1, no log servers on 0.0.0.0, and all of them
    stopped together on Ctrl-C or SIGTERM (Airflow's own standalone leaves them running)."""
    from mmn.airflow_env import STANDALONE_COMPONENTS, api_address, health_url, password_file

    if extra:
        raise ValueError(f"`mmn airflow standalone` takes no further arguments, got {list(extra)}")
    airflow = venv_tool("airflow")
    home = Path(env["AIRFLOW_HOME"])
    logs = home / "logs" / "standalone"
    host, port = api_address(env)
    _warn_if_exposed("the Airflow api-server", host)
    tree = ProcessTree()
    print(f"mmn: airflow db migrate ({env['AIRFLOW__DATABASE__SQL_ALCHEMY_CONN']})", flush=True)
    code = tree.run([airflow, "db", "migrate"], env)
    if code:
        return code
    for name, flags in STANDALONE_COMPONENTS.items():
        tree.start(name, [airflow, name, *flags], env, log_path=logs / f"{name}.log")
    print(f"mmn: started {', '.join(STANDALONE_COMPONENTS)}; their logs: {logs}/", flush=True)

    def ready() -> None:
        print(f"mmn: Airflow UI on http://{host}:{port} (user admin; password in {password_file(env)}); "
              "Ctrl-C stops every component", flush=True)

    return tree.wait(ready=lambda: http_ok(health_url(env)), on_ready=ready)


# ---------------------------------------------------------------- stages


def cmd_build(args: argparse.Namespace) -> int:
    from mmn.tasks import build_day

    manifest = build_day(_cfg(args), args.day)
    _print({k: manifest[k] for k in ("day", "outputs", "quarantined") if k in manifest})
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from mmn.tasks import train_day

    run_id = train_day(_cfg(args), args.day, model_kind=args.model_kind, window_days=args.window_days,
                       ssim=args.ssim)
    print(run_id)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mmn.tasks import evaluate_day

    result = evaluate_day(_cfg(args), args.day, args.run_id)
    _print({k: result[k] for k in ("day", "run_id", "champion_version", "champion_note")}
           | {"metric": {k: v for k, v in result["challenger"].items() if "/" not in k}})
    return 0


def cmd_gate(args: argparse.Namespace) -> int:
    from mmn.tasks import gate_day, load_evaluation

    cfg = _cfg(args)
    _print(gate_day(cfg, args.day, args.run_id, load_evaluation(cfg, args.run_id), dry_run=args.dry_run,
                    min_delta=args.min_delta, floor=args.floor))
    return 0


def cmd_run_day(args: argparse.Namespace) -> int:
    from mmn.tasks import run_day

    _print(run_day(_cfg(args), args.day, model_kind=args.model_kind, dry_run=args.dry_run))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from serving.registry import client_for, lock_for, rollback

    cfg = _cfg(args)
    restored, demoted = rollback(client_for(cfg), cfg.mlflow.registered_model, lock_for(cfg))
    print(f"champion -> version {restored}; version {demoted} is now 'previous' (tagged rolled_back)")
    return 0


def cmd_backfill(args: argparse.Namespace) -> int:
    from mmn.backfill import run_backfill

    days = tuple(args.days.split(":", 1)) if args.days else None
    if days is not None and len(days) != 2:
        raise ValueError("--days takes FIRST:LAST impression days, e.g. 2026-11-01:2026-11-03")
    return run_backfill(_cfg(args), from_date=args.from_date, to_date=args.to_date, days=days,
                        reprocess=args.reprocess)


def cmd_demo(args: argparse.Namespace) -> int:
    from mmn.demo import run_demo

    return run_demo(_cfg(args), start=args.start, days=args.days)


def cmd_config(args: argparse.Namespace) -> int:
    cfg = _cfg(args)
    print(f"# {cfg.source}  config_hash={cfg.config_hash()}")
    print(cfg.to_json())
    return 0


def _passthrough(module: str) -> Callable[[Sequence[str]], int]:
    def run(argv: Sequence[str]) -> int:
        import importlib

        return int(importlib.import_module(module).main(list(argv)) or 0)

    return run


# Commands whose module owns its own argument parser and main(); `mmn` checks the arguments
# with the parser below first (fast --help, `mmn <stage>` in usage and errors), then hands
# the same arguments to the module.
PASSTHROUGH = {
    "generate": ("simulation.generate_logs", "write sample raw logs"),
    "validate": ("validation.runner", "validate a built day with the GX suite"),
    "compare": ("mmn.compare", "train several model kinds on one window and compare them"),
}

DAY_HELP = "impression day, YYYY-MM-DD"
RUN_ID_HELP = "MLflow run id of the challenger (printed by `mmn train`)"
MODEL_KIND_HELP = "model architecture to train (default: model.kind in the config)"


def _add_passthrough_parsers(sub: Any, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("generate", parents=[parent], help=PASSTHROUGH["generate"][1],
                       description="Write deterministic synthetic raw logs (impressions, clicks, conversions) "
                                   "and the true probabilities, per the raw-log contract.")
    p.add_argument("--start", required=True, type=_day, help="first impression day, YYYY-MM-DD")
    p.add_argument("--days", type=int, default=1, help="number of impression days (default 1)")
    p.add_argument("--preset", choices=GENERATOR_PRESETS, help="log shape (default: generator.preset)")
    p.add_argument("--impressions-per-day", type=int, help="default: generator.impressions_per_day")
    p.add_argument("--seed", type=int, help="random seed (default: generator.seed)")
    p.add_argument("--fault-rate", type=float, default=0.0,
                   help="inject each defect class at this rate (default 0: clean logs)")
    p.add_argument("--format", dest="fmt", choices=LOG_FORMATS, default="jsonl",
                   help="file format of the raw logs (default: jsonl)")

    p = sub.add_parser("validate", parents=[parent], help=PASSTHROUGH["validate"][1],
                       description="Validate one day's samples partition with Great Expectations. Exit code 1 "
                                   "when any error-severity check fails (warnings are only logged).")
    p.add_argument("--day", required=True, type=_day, help="day to validate, YYYY-MM-DD")
    p.add_argument("--engine", choices=VALIDATION_ENGINES, default="pandas",
                   help="reader / GX execution engine (default: pandas)")

    p = sub.add_parser("compare", parents=[parent], help=PASSTHROUGH["compare"][1],
                       description="Train MMN and baselines on one day; log a paper-style CVR AUC table to "
                                   "MLflow (one parent run, a child run per kind and seed).")
    p.add_argument("--day", required=True, type=_day, help="the day to train for and hold out (YYYY-MM-DD)")
    p.add_argument("--kinds", required=True,
                   help="comma-separated model kinds, e.g. mmn,dnn,star,lightgbm,lr_crosses "
                        "(networks: see `mmn train --help`; lightgbm and lr_crosses are non-network peers)")
    p.add_argument("--seeds", help="comma-separated training seeds, e.g. 1,2,3 (default: training.seed)")
    p.add_argument("--experiment", help="MLflow experiment (default: <mlflow.experiment>_comparison)")
    p.add_argument("--reference", help="model the paired bootstrap differences are taken against "
                                       "(default: mmn when compared, else the first kind)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parent = _config_parent()
    _add_passthrough_parsers(sub, parent)

    p = sub.add_parser("build", parents=[parent], help="build a day's samples with spark-submit")
    p.add_argument("--day", required=True, type=_day, help=DAY_HELP)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("train", parents=[parent], help="train on the day's window, log to MLflow")
    p.add_argument("--day", required=True, type=_day, help=f"{DAY_HELP}; trains on the days before it")
    p.add_argument("--model-kind", choices=MODEL_KINDS, metavar="KIND",
                   help=f"{MODEL_KIND_HELP}; one of: {', '.join(MODEL_KINDS)}")
    p.add_argument("--window-days", type=int, help="training days before --day (default: windows.train_window_days)")
    p.add_argument("--ssim", choices=SSIM_MODES,
                   help="scenario-shared instance selection before training (default: ssim.mode in the config)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", parents=[parent], help="score challenger and champion on the holdout")
    p.add_argument("--day", required=True, type=_day, help=f"{DAY_HELP} (the holdout)")
    p.add_argument("--run-id", required=True, help=RUN_ID_HELP)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("gate", parents=[parent], help="apply the gate; register and promote")
    p.add_argument("--day", required=True, type=_day, help=DAY_HELP)
    p.add_argument("--run-id", required=True, help=RUN_ID_HELP)
    p.add_argument("--dry-run", action="store_true", help="decide and report, register and promote nothing")
    p.add_argument("--min-delta", type=float, help="required gain over the champion (default: gate.min_delta)")
    p.add_argument("--floor", type=float, help="lowest acceptable metric (default: gate.floor)")
    p.set_defaults(func=cmd_gate)

    p = sub.add_parser("run-day", parents=[parent], help="build, validate, train, evaluate, gate (no Airflow)")
    p.add_argument("--day", required=True, type=_day, help=DAY_HELP)
    p.add_argument("--model-kind", choices=MODEL_KINDS, metavar="KIND",
                   help=f"{MODEL_KIND_HELP}; one of: {', '.join(MODEL_KINDS)}")
    p.add_argument("--dry-run", action="store_true", help="train and evaluate, promote nothing")
    p.set_defaults(func=cmd_run_day)

    p = sub.add_parser("rollback", parents=[parent], help="champion <- previous")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("serve", parents=[parent], help="serve a registered alias over HTTP (127.0.0.1)")
    p.add_argument("--alias", default="champion", help="registry alias to serve (default: champion)")
    p.add_argument("--host", default=LOOPBACK, help=f"interface to listen on (default: {LOOPBACK})")
    p.add_argument("--port", type=int, default=5001, help="port to listen on (default: 5001)")
    p.add_argument("--workers", type=int, default=1, help="server worker processes (default: 1)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("mlflow-ui", parents=[parent], help="MLflow UI on the configured store (127.0.0.1)")
    p.add_argument("--host", default=LOOPBACK, help=f"interface to listen on (default: {LOOPBACK})")
    p.add_argument("--port", type=int, default=5000, help="port to listen on (default: 5000)")
    p.add_argument("--workers", type=int, default=1,
                   help="server worker processes (default: 1; MLflow's own default of 4 overloads small machines)")
    p.set_defaults(func=cmd_mlflow_ui)

    p = sub.add_parser("airflow", parents=[parent], help="run the airflow CLI in the embedded setup",
                       description="The airflow CLI on the project-local setup (SQLite, LocalExecutor). "
                                   "`mmn airflow standalone` runs api-server, scheduler, dag-processor and "
                                   "triggerer on 127.0.0.1 and stops them all together.")
    p.add_argument("--host", help="api-server interface (default: $AIRFLOW__API__HOST, else 127.0.0.1)")
    p.add_argument("--port", type=int, help="api-server port (default: $AIRFLOW__API__PORT, else 8080)")
    p.add_argument("airflow_args", nargs=argparse.REMAINDER, metavar="AIRFLOW_ARGS",
                   help="arguments of the airflow CLI, e.g. standalone, or dags list")
    p.set_defaults(func=cmd_airflow)

    p = sub.add_parser("backfill", parents=[parent], help="queue a backfill of the daily DAG")
    p.add_argument("--from-date", help="first logical date (Airflow's --from-date)")
    p.add_argument("--to-date", help="last logical date, inclusive (Airflow's --to-date)")
    p.add_argument("--days", metavar="FIRST:LAST", help="or: the impression days to build, e.g. 2026-11-01:2026-11-03")
    p.add_argument("--reprocess", default="completed", choices=["none", "failed", "completed"],
                   help="which existing runs to run again (default: completed)")
    p.set_defaults(func=cmd_backfill)

    p = sub.add_parser("demo", parents=[parent], help="generate logs and run the daily DAG for each day")
    p.add_argument("--start", type=_day, help="first day (default: airflow.start_date from the config)")
    p.add_argument("--days", type=int, default=3, help="number of days (default: 3)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("config", parents=[parent], help="print the effective config and its hash")
    p.set_defaults(func=cmd_config)
    return parser


def _thread_env(argv: Sequence[str]) -> None:
    """Put the thread policy's OMP_WAIT_POLICY / OMP_NUM_THREADS (runtime.*, core.threads) into
    this process's environment before any command imports torch: libgomp reads them once, when
    it loads. Children (spark-submit, torchrun, the model server) inherit them."""
    from core.config import ConfigError
    from core.threads import configure_process

    known, _ = _config_parent().parse_known_args(argv)
    try:
        configure_process(load_config(known.config, overrides=known.overrides))
    except (ConfigError, ValueError, OSError):
        pass  # the command itself loads the config and reports what is wrong with it


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Tools found by bare name further down (spark-submit, airflow) are this venv's, even
    # when the venv is not activated.
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    parser = build_parser()
    if argv and argv[0] in PASSTHROUGH:
        parser.parse_known_args(argv)  # --help, usage errors and choices in `mmn <stage>` terms
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        _thread_env(argv)
        return _passthrough(PASSTHROUGH[argv[0]][0])(argv[1:])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _thread_env(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"mmn {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
