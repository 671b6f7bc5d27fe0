"""Issue 19 item 1, the thread policy: the usable-CPU count (cgroup v1/v2 quota files,
affinity), the per-task share, the config section, and that training, serving, the CLI,
Airflow's environment and spark-submit apply it. No timing asserts (docs/benchmarks.md has
the measurement)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from core.config import ConfigError, Runtime, config_from_mapping, load_config
from core.threads import (
    ThreadPolicy,
    cgroup_cpu_limit,
    parse_cfs,
    parse_cpu_max,
    process_env,
    resolve_policy,
    set_process_env,
    spark_conf,
    spark_master,
    usable_cpus,
)


@pytest.fixture()
def restore_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ------------------------------------------------------------------ CPU count


@pytest.mark.parametrize("text, cpus", [("max 100000", None), ("150000 100000", 1.5), ("50000", 0.5),
                                         ("200000 50000", 4.0), ("", None)])
def test_cpu_max_parsing(text, cpus):
    assert parse_cpu_max(text) == cpus


def test_cfs_parsing():
    assert parse_cfs("-1", "100000") is None
    assert parse_cfs("250000", "100000") == 2.5
    assert parse_cfs(None, "100000") is None


def test_cgroup_v2_takes_the_smallest_quota_on_the_path(tmp_path):
    root = tmp_path / "cgroup"
    _write(root / "cpu.max", "max 100000\n")
    _write(root / "app" / "cpu.max", "300000 100000\n")
    _write(root / "app" / "task" / "cpu.max", "max 100000\n")  # unlimited itself, its parent is not
    self_cgroup = tmp_path / "self_cgroup"
    _write(self_cgroup, "0::/app/task\n")
    assert cgroup_cpu_limit(root, self_cgroup) == 3.0
    _write(root / "app" / "task" / "cpu.max", "150000 100000\n")
    assert cgroup_cpu_limit(root, self_cgroup) == 1.5


def test_cgroup_v2_unlimited_and_missing_files(tmp_path):
    root = tmp_path / "cgroup"
    _write(root / "cpu.max", "max 100000\n")
    self_cgroup = tmp_path / "self_cgroup"
    _write(self_cgroup, "0::/\n")
    assert cgroup_cpu_limit(root, self_cgroup) is None
    assert cgroup_cpu_limit(tmp_path / "nowhere", tmp_path / "no_such_file") is None


def test_cgroup_v1_cfs_quota(tmp_path):
    root = tmp_path / "cgroup"
    task = root / "cpu,cpuacct" / "docker" / "abc"
    _write(task / "cpu.cfs_quota_us", "150000\n")
    _write(task / "cpu.cfs_period_us", "100000\n")
    self_cgroup = tmp_path / "self_cgroup"
    _write(self_cgroup, "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n")
    assert cgroup_cpu_limit(root, self_cgroup) == 1.5
    _write(task / "cpu.cfs_quota_us", "-1\n")
    assert cgroup_cpu_limit(root, self_cgroup) is None


def test_cgroup_v1_mounted_at_the_container_root(tmp_path):
    """Inside a container the cgroup path (/docker/abc) is not below the mount: the mount's
    own files hold the container's quota."""
    root = tmp_path / "cgroup"
    _write(root / "cpu" / "cpu.cfs_quota_us", "200000\n")
    _write(root / "cpu" / "cpu.cfs_period_us", "100000\n")
    self_cgroup = tmp_path / "self_cgroup"
    _write(self_cgroup, "3:cpu:/docker/abc\n")
    assert cgroup_cpu_limit(root, self_cgroup) == 2.0


def test_usable_cpus_is_the_smaller_of_affinity_and_the_rounded_up_quota(tmp_path):
    root = tmp_path / "cgroup"
    self_cgroup = tmp_path / "self_cgroup"
    _write(self_cgroup, "0::/job\n")
    _write(root / "job" / "cpu.max", "150000 100000\n")
    eight = lambda pid: set(range(8))  # noqa: E731
    assert usable_cpus(root, self_cgroup, eight)[0] == 2  # 1.5 CPUs of quota: 2 threads
    assert usable_cpus(root, self_cgroup, lambda pid: {3})[0] == 1  # pinned to one CPU
    _write(root / "job" / "cpu.max", "max 100000\n")
    cpus, sources = usable_cpus(root, self_cgroup, eight)
    assert cpus == 8 and sources == {"affinity": 8, "cgroup_quota": None}
    _write(root / "job" / "cpu.max", "20000 100000\n")  # a fifth of a CPU still gets one thread
    assert usable_cpus(root, self_cgroup, eight)[0] == 1


# ------------------------------------------------------------------ the policy


def test_auto_divides_the_usable_cpus_among_the_concurrent_tasks():
    auto = Runtime()
    assert resolve_policy(auto, 2, (8, {})).threads == 4
    assert resolve_policy(auto, 2, (2, {})).threads == 1
    assert resolve_policy(auto, 4, (2, {})).threads == 1  # never below one
    assert resolve_policy(auto, 1, (2, {})).spark_cores == 2
    fixed = Runtime(threads=3, omp_wait_policy="active", spark_cores=2)
    policy = resolve_policy(fixed, 2, (8, {}))
    assert (policy.threads, policy.spark_cores, policy.omp_wait_policy, policy.interop_threads) == (3, 2, "active", 1)


def test_runtime_section_in_the_config():
    cfg = load_config(environ={})
    assert cfg.runtime == Runtime()  # the YAML's values are the dataclass defaults (old bundles)
    assert load_config(environ={"MMN__RUNTIME__THREADS": "3"}).runtime.threads == 3
    assert load_config(environ={}, overrides=["runtime.omp_wait_policy=active"]).runtime.omp_wait_policy == "active"
    for bad in ("runtime.threads=0", "runtime.threads=many", "runtime.spark_cores=true",
                "runtime.omp_wait_policy=spin"):
        with pytest.raises(ConfigError, match="runtime"):
            load_config(environ={}, overrides=[bad])
    old_bundle = {k: v for k, v in cfg.raw.items() if k != "runtime"}
    assert config_from_mapping(old_bundle).runtime == Runtime()


def test_process_env_keeps_what_the_operator_exported():
    policy = ThreadPolicy(threads=2, interop_threads=1, omp_wait_policy="passive", spark_cores=2, explain="")
    assert process_env(policy) == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert set_process_env(policy, env)["OMP_WAIT_POLICY"] == "ACTIVE"
    assert env["OMP_NUM_THREADS"] == "2"


def test_spark_cores_follow_the_policy():
    assert spark_master("local[*]", 1) == "local[1]"
    assert spark_master("local", 3) == "local[3]"
    assert spark_master("local[*, 4]", 2) == "local[2, 4]"
    assert spark_master("local[4]", 1) == "local[4]"  # an explicit count is kept
    assert spark_master("spark://host:7077", 1) == "spark://host:7077"
    policy = ThreadPolicy(threads=1, interop_threads=1, omp_wait_policy="passive", spark_cores=3, explain="")
    assert spark_conf(policy, "spark://host:7077")["spark.cores.max"] == "3"
    local = spark_conf(policy, "local[*]")
    assert "spark.cores.max" not in local and local["spark.executorEnv.OMP_WAIT_POLICY"] == "PASSIVE"


def test_spark_submit_and_airflow_get_the_policy():
    import json

    from core.threads import policy_for
    from mmn.airflow_env import airflow_env
    from mmn.build import spark_submit_command, spark_submit_conf

    cfg = load_config(environ={}, overrides=["spark.master=local[*]", "runtime.spark_cores=1",
                                             "runtime.threads=1"])
    command = spark_submit_command(cfg, "2026-11-02")
    assert command[command.index("--master") + 1] == "local[1]"
    assert spark_submit_conf(cfg)["spark.executorEnv.OMP_WAIT_POLICY"] == "PASSIVE"
    env = airflow_env(cfg)
    assert json.loads(env["AIRFLOW_CONN_SPARK_DEFAULT"])["host"] == "local[1]"
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["OMP_NUM_THREADS"] == str(policy_for(cfg).threads)


# ------------------------------------------------------------------ applied by the stages


def test_train_applies_the_configured_thread_count(monkeypatch, restore_torch_threads):
    import training.trainer as trainer
    from training.options import TrainOptions

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(trainer, "init_distributed", stop)  # right after the thread setup
    torch.set_num_threads(1)
    cfg = load_config(overrides=["runtime.threads=3"])
    with pytest.raises(Stop):
        trainer.train(cfg, ["2026-11-02"])
    assert torch.get_num_threads() == 3
    with pytest.raises(Stop):  # an explicit TrainOptions.num_threads wins
        trainer.train(cfg, ["2026-11-02"], TrainOptions(num_threads=2))
    assert torch.get_num_threads() == 2
    auto = load_config(overrides=["runtime.threads=auto"])
    from core.threads import policy_for

    with pytest.raises(Stop):
        trainer.train(auto, ["2026-11-02"])
    assert torch.get_num_threads() == policy_for(auto).threads


def test_serving_applies_the_model_configs_thread_count(tmp_path, restore_torch_threads):
    from serving.pyfunc import ModelBundle, ServingModel
    from training.models import build_model

    cfg = load_config(overrides=["runtime.threads=2"])
    model = build_model(cfg, 2, 2, "mmn")
    weights = tmp_path / "weights.pt"
    torch.save(model.state_dict(), weights)
    bundle = tmp_path / "bundle.json"
    bundle.write_text(ModelBundle(config=cfg.raw, model_kind="mmn", n_types=2, n_scenarios=2,
                                  types=["a", "b"], scenarios=["x", "y"]).to_json())
    torch.set_num_threads(1)
    ServingModel.load(bundle, weights)
    assert torch.get_num_threads() == 2
    # A bundle written before the runtime section: the defaults (auto) apply.
    from core.threads import policy_for

    old = dataclasses.replace(ModelBundle.from_json(bundle.read_text()))
    old.config = {k: v for k, v in old.config.items() if k != "runtime"}
    bundle.write_text(old.to_json())
    ServingModel.load(bundle, weights)
    assert torch.get_num_threads() == policy_for(config_from_mapping(old.config)).threads


def test_cli_sets_the_wait_policy_before_any_command_runs(monkeypatch):
    import os

    from mmn import cli

    for key in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(key, raising=False)
    cli._thread_env(["train", "--day", "2026-11-02", "--set", "runtime.omp_wait_policy=active",
                     "--set", "runtime.threads=1"])
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE" and os.environ["OMP_NUM_THREADS"] == "1"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    cli._thread_env(["train", "--set", "runtime.threads=lots"])  # a bad config: the command reports it
    assert "OMP_WAIT_POLICY" not in os.environ
