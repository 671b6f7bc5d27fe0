"""Serving latency and throughput of the MLflow pyfunc: in-process and over HTTP.

A model of the configured size (MMN by default, DNN for reference) is logged as the
pipeline logs it (pyfunc with the hashing config and vocabularies inside) into a scratch
MLflow store, then scored on raw impression records from the generator:

- in-process: ``mlflow.pyfunc.load_model(uri).predict`` on one-record DataFrames (p50/p99)
  and on a large batch (rows/s);
- HTTP: ``mlflow models serve -m <uri> --env-manager local`` on 127.0.0.1, one-record
  ``/invocations`` requests over a kept-alive connection (p50/p99), and batches of
  ``--http-batch`` records (rows/s).

The weights are untrained: latency doesn't depend on them.

    PYTHONPATH=. python benchmarks/bench_serving.py [--kinds mmn,dnn] [--json out.json]
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from core.config import load_config


def raw_records(cfg, day: str) -> list[dict]:
    records = []
    for path in sorted(cfg.paths.raw_dir("impressions", day).glob("*.jsonl*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as fh:
            records.extend(json.loads(line) for line in fh)
    return records


def log_model(cfg, kind: str, types: list[str], scenarios: list[str], example: pd.DataFrame) -> str:
    import mlflow

    from serving.pyfunc import ModelBundle, log_serving_model
    from training.models import build_model

    torch.manual_seed(0)
    model = build_model(cfg, len(types), len(scenarios), kind).eval()
    bundle = ModelBundle(config=cfg.raw, model_kind=kind, n_types=len(types), n_scenarios=len(scenarios),
                         types=types, scenarios=scenarios)
    with mlflow.start_run(run_name=f"bench-serving-{kind}"):
        return log_serving_model(cfg, model, bundle, example).model_uri


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(samples_ms, 50)), "p99_ms": float(np.percentile(samples_ms, 99))}


def in_process(uri: str, records: list[dict], requests: int, batch: int) -> dict[str, float]:
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(uri)
    singles = [pd.DataFrame([r]) for r in records[:requests]]
    for frame in singles[:50]:  # warm-up: composed-weight cache, allocator
        model.predict(frame)
    lat = []
    for frame in singles:
        start = time.perf_counter()
        model.predict(frame)
        lat.append((time.perf_counter() - start) * 1e3)
    big = pd.DataFrame(records[:batch])
    start = time.perf_counter()
    model.predict(big)
    rows_per_s = len(big) / (time.perf_counter() - start)
    return {**percentiles(lat), "batch_rows": len(big), "batch_rows_per_s": rows_per_s}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def over_http(uri: str, records: list[dict], requests: int, batch: int, env: dict[str, str]) -> dict[str, float]:
    port = _free_port()
    log = tempfile.NamedTemporaryFile(prefix="mlflow-serve-", suffix=".log", delete=False)
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conn.request("GET", "/ping")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"model server did not come up; its log: {log.name}")
            time.sleep(1)

        def post(body: bytes) -> None:
            conn.request("POST", "/invocations", body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            payload = response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {payload[:300]!r}")

        bodies = [json.dumps({"dataframe_records": [r]}).encode() for r in records[:requests]]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for body in bodies[:50]:
            post(body)
        lat = []
        for body in bodies:
            start = time.perf_counter()
            post(body)
            lat.append((time.perf_counter() - start) * 1e3)
        batches = [records[i:i + batch] for i in range(0, min(len(records), 20 * batch), batch)]
        start = time.perf_counter()
        for chunk in batches:
            post(json.dumps({"dataframe_records": chunk}).encode())
        rows_per_s = sum(map(len, batches)) / (time.perf_counter() - start)
        return {**percentiles(lat), "batch_rows": batch, "batch_rows_per_s": rows_per_s}
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="mmn,dnn")
    parser.add_argument("--requests", type=int, default=1000, help="single-record requests per path")
    parser.add_argument("--batch", type=int, default=20000, help="in-process batch size")
    parser.add_argument("--http-batch", type=int, default=1000, help="records per HTTP batch request")
    parser.add_argument("--impressions", type=int, default=30000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in-process")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        root = Path(tmp)
        env = {**os.environ,
               "MMN__PATHS__RAW_ROOT": str(root / "raw"), "MMN__PATHS__TRUTH_ROOT": str(root / "truth"),
               "MMN__MLFLOW__TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
               "MMN__MLFLOW__ARTIFACT_ROOT": str(root / "artifacts"),
               "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
               "OMP_NUM_THREADS": str(args.threads),
               # `mlflow models serve` starts uvicorn by name: the venv's bin must be on PATH.
               "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
        cfg = load_config(environ=env)
        from mmn.tasks import setup_mlflow
        from simulation.generate_logs import generate

        day = cfg.airflow.start_date
        generate(cfg, day, 1, impressions_per_day=args.impressions, fault_rate=0.0)
        records = raw_records(cfg, day)
        types = sorted({r[cfg.domains.type_field] for r in records})
        scenarios = sorted({r[cfg.domains.scenario_field] for r in records})
        setup_mlflow(cfg, "bench-serving")
        print(f"{len(records)} records, {len(types)} types x {len(scenarios)} scenarios, "
              f"cvr_hidden={list(cfg.model.cvr_hidden)}, threads={args.threads}, "
              f"load_avg={os.getloadavg()[0]:.2f}", flush=True)
        results = {}
        for kind in args.kinds.split(","):
            uri = log_model(cfg, kind, types, scenarios, pd.DataFrame(records[:5]))
            results[f"{kind}/in_process"] = r = in_process(uri, records, args.requests, args.batch)
            print(f"{kind:<4} in-process  1 record  p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms   "
                  f"batch of {r['batch_rows']}: {r['batch_rows_per_s']:,.0f} rows/s", flush=True)
            results[f"{kind}/http"] = r = over_http(uri, records, args.requests, args.http_batch, env)
            print(f"{kind:<4} HTTP        1 record  p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms   "
                  f"batches of {r['batch_rows']}: {r['batch_rows_per_s']:,.0f} rows/s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
