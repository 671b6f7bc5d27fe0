"""Serving latency and throughput of the MLflow pyfunc: in-process and over HTTP.

A model of the configured size (MMN by default, DNN for reference) is logged as the
pipeline logs it (pyfunc with the hashing config and vocabularies inside) into a scratch
MLflow store, then scored on raw impression records from the generator:

- in-process: ``mlflow.pyfunc.load_model(uri).predict`` on one-record DataFrames (p50/p99)
  and on a large batch (rows/s); with the one-record path taken apart: the python model's
  own ``predict`` (what MLflow's wrapper adds is the difference), MLflow's scoring function
  ``scoring_server.invocations`` on the JSON body without the server (JSON to DataFrame,
  predict, DataFrame to JSON: what HTTP adds beyond it is uvicorn and the network), ``ServingModel.
  predict_json_records([record])`` (our hashing, the model, the answer frame; the difference
  to the python model is reading the request frame) and the model's ``predict_domain`` on the
  hashed ids;
- HTTP: ``mlflow models serve -m <uri> --env-manager local`` on 127.0.0.1 (one uvicorn
  worker), one-record ``/invocations`` requests over a kept-alive connection (p50/p99), and
  batches of ``--http-batch`` records (rows/s). The kinds' servers run side by side.

Every one-record measurement is interleaved: blocks of ``--block`` requests rotate over the
kinds and paths within each of ``--rounds`` rounds, so that each sees the same machine load,
and the ratio of the first kind to the last is given per round. The weights are untrained
(latency doesn't depend on them); requests carry the generator's own domain mix.

    PYTHONPATH=. python benchmarks/bench_serving.py [--kinds mmn,dnn] [--json out.json]
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
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


def interleaved(paths: dict[tuple[str, str], Callable[[int], object]], n: int, block: int,
                rounds: int) -> dict[tuple[str, str], list[list[float]]]:
    """Latencies (ms) per path and round: request i of every path, blocks rotated per round."""
    keys = list(paths)
    lat = {k: [[] for _ in range(rounds)] for k in keys}
    for rnd in range(rounds):
        for b, start in enumerate(range(0, n, block)):
            shift = (b + rnd) % len(keys)
            for key in keys[shift:] + keys[:shift]:
                fn, sink = paths[key], lat[key][rnd]
                for i in range(start, min(n, start + block)):
                    t0 = time.perf_counter()
                    fn(i)
                    sink.append((time.perf_counter() - t0) * 1e3)
    return lat


def summarize(lat: dict[tuple[str, str], list[list[float]]], kinds: list[str], label: str) -> dict[str, dict]:
    out = {}
    for (kind, path), per_round in lat.items():
        ref = lat[(kinds[-1], path)]
        ratios = [float(np.percentile(a, 50) / np.percentile(b, 50)) for a, b in zip(per_round, ref, strict=True)]
        every = np.concatenate(per_round)
        r = out[f"{kind}/{label}/{path}"] = {**percentiles(list(every)), "ratio_p50_per_round": ratios,
                                             "p50_per_round_ms": [float(np.percentile(x, 50)) for x in per_round]}
        print(f"{kind:<4} {label:<10} {path:<22} p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  "
              f"rounds {', '.join(f'{x:.3f}' for x in r['p50_per_round_ms'])}  "
              f"{kinds[0]}/{kinds[-1]} {', '.join(f'{x:.2f}' for x in ratios)}", flush=True)
    return out


def in_process(uris: dict[str, str], records: list[dict], requests: int, batch: int, block: int,
               rounds: int) -> dict[str, dict]:
    import mlflow.pyfunc

    kinds = list(uris)
    models = {k: mlflow.pyfunc.load_model(u) for k, u in uris.items()}
    from mlflow.pyfunc import scoring_server

    singles = [pd.DataFrame([r]) for r in records[:requests]]
    bodies = [json.dumps({"dataframe_records": [r]}) for r in records[:requests]]
    paths: dict[tuple[str, str], Callable[[int], object]] = {}
    for kind, model in models.items():
        python_model = model.unwrap_python_model()
        serving = python_model.serving
        ids = [serving.encode(r) for r in records[:requests]]
        # MLflow's scoring function as the HTTP server calls it, without the server: JSON body
        # to DataFrame, pyfunc.predict, DataFrame to JSON text.
        paths[(kind, "scoring.invocations")] = (lambda i, m=model: scoring_server.invocations(
            bodies[i], "application/json", m, None))
        paths[(kind, "pyfunc.predict")] = lambda i, m=model: m.predict(singles[i])
        paths[(kind, "python_model.predict")] = lambda i, m=python_model: m.predict(None, singles[i])
        paths[(kind, "predict_json_records")] = lambda i, s=serving: s.predict_json_records([records[i]])
        paths[(kind, "predict_domain")] = (lambda i, s=serving, ids=ids:
                                           s.model.predict_domain([ids[i][0]], ids[i][1], ids[i][2]))
    interleaved(paths, requests, block, 1)  # warm-up: every request once (composed-tower cache)
    results = summarize(interleaved(paths, requests, block, rounds), kinds, "in-process")
    big = pd.DataFrame(records[:batch])
    for kind, model in models.items():
        start = time.perf_counter()
        model.predict(big)
        rate = len(big) / (time.perf_counter() - start)
        results[f"{kind}/in-process/batch"] = {"batch_rows": len(big), "batch_rows_per_s": rate}
        print(f"{kind:<4} in-process batch of {len(big)}: {rate:,.0f} rows/s", flush=True)
    return results


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(uri: str, env: dict[str, str]) -> tuple[subprocess.Popen, int, str]:
    port = _free_port()
    log = tempfile.NamedTemporaryFile(prefix="mlflow-serve-", suffix=".log", delete=False)
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return server, port, log.name


def wait_ready(server: subprocess.Popen, port: int, log: str) -> None:
    deadline = time.monotonic() + 180
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/ping")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            raise RuntimeError(f"model server did not come up; its log: {log}")
        time.sleep(1)


def stop(server: subprocess.Popen) -> None:
    """Stop the server's whole process group (mlflow models serve runs uvicorn as a child)."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


def over_http(uris: dict[str, str], records: list[dict], requests: int, batch: int, block: int, rounds: int,
              env: dict[str, str]) -> dict[str, dict]:
    kinds = list(uris)
    servers = {k: start_server(u, env) for k, u in uris.items()}
    try:
        conns = {}
        for kind, (server, port, log) in servers.items():
            wait_ready(server, port, log)
            conns[kind] = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

        def post(conn: http.client.HTTPConnection, body: bytes) -> None:
            conn.request("POST", "/invocations", body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            payload = response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {payload[:300]!r}")

        bodies = [json.dumps({"dataframe_records": [r]}).encode() for r in records[:requests]]
        paths = {(k, "/invocations"): (lambda i, c=c: post(c, bodies[i])) for k, c in conns.items()}
        interleaved(paths, requests, block, 1)  # warm-up: every request once
        results = summarize(interleaved(paths, requests, block, rounds), kinds, "HTTP")
        batches = [records[i:i + batch] for i in range(0, min(len(records), 20 * batch), batch)]
        for kind, (_, port, _) in servers.items():
            # a fresh connection: uvicorn closes one idle for 5 s (while the other kind ran)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            start = time.perf_counter()
            for chunk in batches:
                post(conn, json.dumps({"dataframe_records": chunk}).encode())
            rate = sum(map(len, batches)) / (time.perf_counter() - start)
            results[f"{kind}/HTTP/batch"] = {"batch_rows": batch, "batch_rows_per_s": rate}
            print(f"{kind:<4} HTTP batches of {batch}: {rate:,.0f} rows/s", flush=True)
        return results
    finally:
        for server, _, _ in servers.values():
            stop(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="mmn,dnn")
    parser.add_argument("--requests", type=int, default=1000, help="single-record requests per path")
    parser.add_argument("--batch", type=int, default=20000, help="in-process batch size")
    parser.add_argument("--http-batch", type=int, default=1000, help="records per HTTP batch request")
    parser.add_argument("--impressions", type=int, default=30000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in-process")
    parser.add_argument("--block", type=int, default=50, help="requests per interleaved block")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-http", action="store_true")
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
              f"load average {os.getloadavg()}", flush=True)
        uris = {kind: log_model(cfg, kind, types, scenarios, pd.DataFrame(records[:5]))
                for kind in args.kinds.split(",")}
        results = in_process(uris, records, args.requests, args.batch, args.block, args.rounds)
        if not args.no_http:
            results.update(over_http(uris, records, args.requests, args.http_batch, args.block, args.rounds, env))
        print(f"load average at the end {os.getloadavg()}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
