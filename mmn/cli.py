"""`mmn <stage>`: every pipeline stage runnable alone, plus the operational commands.

Stages (build, validate, train, evaluate, gate, run-day) call the same functions as the
DAG tasks (mmn.tasks), so a stage run by hand behaves exactly as it does under Airflow.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence

from core.config import PipelineConfig, add_config_arguments, load_config


def _config_parent() -> argparse.ArgumentParser:
    return add_config_arguments(argparse.ArgumentParser(add_help=False))


def _cfg(args: argparse.Namespace) -> PipelineConfig:
    return load_config(args.config, overrides=args.overrides)


def _print(obj: object) -> None:
    print(json.dumps(obj, indent=1, default=str))


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
    from serving.registry import client_for, rollback

    cfg = _cfg(args)
    restored, demoted = rollback(client_for(cfg), cfg.mlflow.registered_model)
    print(f"champion -> version {restored}; version {demoted} is now 'previous' (tagged rolled_back)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _cfg(args)
    env = {**os.environ, "MLFLOW_TRACKING_URI": cfg.mlflow.tracking_uri}
    uri = f"models:/{cfg.mlflow.registered_model}@{args.alias}"
    argv = ["mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
            "--host", "127.0.0.1", "--port", str(args.port)]
    os.execvpe(argv[0], argv, env)
    return 0  # unreachable


def cmd_mlflow_ui(args: argparse.Namespace) -> int:
    cfg = _cfg(args)
    argv = ["mlflow", "ui", "--backend-store-uri", cfg.mlflow.tracking_uri,
            "--host", "127.0.0.1", "--port", str(args.port)]
    print(f"MLflow UI on http://127.0.0.1:{args.port} (Ctrl-C to stop)")
    os.execvp(argv[0], argv)
    return 0


def cmd_airflow(args: argparse.Namespace) -> int:
    from mmn.airflow_env import apply

    apply(_cfg(args))
    argv = ["airflow", *args.airflow_args]
    os.execvp(argv[0], argv)
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


PASSTHROUGH = {
    "generate": ("simulation.generate_logs", "write sample raw logs (see `mmn generate --help`)"),
    "validate": ("validation.runner", "validate a built day with the GX suite"),
    "compare": ("mmn.compare", "train several model kinds on one window and compare them"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    parent = _config_parent()
    for name, (_, help_text) in PASSTHROUGH.items():
        sub.add_parser(name, help=help_text, add_help=False)

    p = sub.add_parser("build", parents=[parent], help="build a day's samples with spark-submit")
    p.add_argument("--day", required=True)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("train", parents=[parent], help="train on the day's window, log to MLflow")
    p.add_argument("--day", required=True)
    p.add_argument("--model-kind")
    p.add_argument("--window-days", type=int)
    p.add_argument("--ssim", choices=["off", "search", "reuse"], help="default: ssim.mode in the config")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", parents=[parent], help="score challenger and champion on the holdout")
    p.add_argument("--day", required=True)
    p.add_argument("--run-id", required=True)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("gate", parents=[parent], help="apply the gate; register and promote")
    p.add_argument("--day", required=True)
    p.add_argument("--run-id", required=True)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--min-delta", type=float)
    p.add_argument("--floor", type=float)
    p.set_defaults(func=cmd_gate)

    p = sub.add_parser("run-day", parents=[parent], help="build, validate, train, evaluate, gate (no Airflow)")
    p.add_argument("--day", required=True)
    p.add_argument("--model-kind")
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(func=cmd_run_day)

    p = sub.add_parser("rollback", parents=[parent], help="champion <- previous")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("serve", parents=[parent], help="serve a registered alias over HTTP on 127.0.0.1")
    p.add_argument("--alias", default="champion")
    p.add_argument("--port", type=int, default=5001)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("mlflow-ui", parents=[parent], help="MLflow UI on the configured store")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_mlflow_ui)

    p = sub.add_parser("airflow", parents=[parent], help="run the airflow CLI in the embedded setup")
    p.add_argument("airflow_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_airflow)

    p = sub.add_parser("backfill", parents=[parent], help="queue a backfill of the daily DAG")
    p.add_argument("--from-date", help="first logical date (Airflow's --from-date)")
    p.add_argument("--to-date", help="last logical date, inclusive (Airflow's --to-date)")
    p.add_argument("--days", metavar="FIRST:LAST", help="or: the impression days to build, e.g. 2026-11-01:2026-11-03")
    p.add_argument("--reprocess", default="completed", choices=["none", "failed", "completed"])
    p.set_defaults(func=cmd_backfill)

    p = sub.add_parser("demo", parents=[parent], help="generate logs and run the daily DAG for each day")
    p.add_argument("--start", help="first day (default: airflow.start_date from the config)")
    p.add_argument("--days", type=int, default=3)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("config", parents=[parent], help="print the effective config and its hash")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if argv and argv[0] in PASSTHROUGH:
        return _passthrough(PASSTHROUGH[argv[0]][0])(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"mmn {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
