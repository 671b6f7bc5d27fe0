"""Load and validate the pipeline config (conf/pipeline.yaml), the one source of truth.

Every stage calls :func:`load_config`. Overrides come, in increasing precedence, from
environment variables ``MMN__<SECTION>__<KEY>=<yaml value>`` and from ``--set
section.key=value`` pairs given on a command line. Values are parsed as YAML, so
``MMN__TRAINING__EPOCHS=2`` gives an int and ``MMN__MODEL__CVR_HIDDEN=[64,32]`` a list.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_PATH = REPO_ROOT / "conf" / "pipeline.yaml"
CONFIG_ENV_VAR = "MMN_CONFIG"
ENV_PREFIX = "MMN__"
SPARK_XXHASH64_SEED = 42


class ConfigError(ValueError):
    """The pipeline config is missing a key or holds a value no stage can use."""


@dataclass(frozen=True)
class FeatureField:
    """One impression field that becomes a model input, hashed into its own id space."""

    name: str
    kind: str  # "categorical" | "numeric"
    buckets: int = 0
    boundaries: tuple[float, ...] = ()

    @property
    def cardinality(self) -> int:
        """Number of ids this field can produce, id 0 (missing) included."""
        if self.kind == "categorical":
            return self.buckets
        return len(self.boundaries) + 2

    @property
    def column(self) -> str:
        """Name of the hashed id column in the samples dataset."""
        return f"feat_{self.name}"


@dataclass(frozen=True)
class LogSpec:
    id_field: str
    required: dict[str, str]


@dataclass(frozen=True)
class Paths:
    raw_root: Path
    lake_root: Path
    truth_root: Path
    reports_root: Path

    def raw_dir(self, log: str, day: str) -> Path:
        return self.raw_root / log / f"dt={day}"

    @property
    def samples_root(self) -> Path:
        return self.lake_root / "samples"

    def samples_dir(self, day: str) -> Path:
        return self.samples_root / f"dt={day}"

    @property
    def quarantine_root(self) -> Path:
        return self.lake_root / "quarantine"

    def quarantine_dir(self, day: str) -> Path:
        return self.quarantine_root / f"dt={day}"

    def manifest_path(self, day: str) -> Path:
        return self.lake_root / "manifests" / f"dt={day}.json"

    @property
    def vocab_dir(self) -> Path:
        return self.lake_root / "vocab"

    def validation_dir(self, day: str) -> Path:
        return self.lake_root / "validation" / f"dt={day}"

    def truth_dir(self, day: str) -> Path:
        return self.truth_root / f"dt={day}"

    def truth_file(self, day: str) -> Path:
        """The generator's side file of true probabilities for a day (never in the logs)."""
        return self.truth_dir(day) / "truth.parquet"

    @property
    def failures_log(self) -> Path:
        return self.reports_root / "failures.log"


@dataclass(frozen=True)
class Domains:
    type_field: str
    scenario_field: str
    value_pattern: str
    max_types: int
    max_scenarios: int


@dataclass(frozen=True)
class Hashing:
    algorithm: str
    seed: int


@dataclass(frozen=True)
class Windows:
    click_window_minutes: int
    attribution_window_hours: int
    label_delay_days: int
    train_window_days: int
    holdout_rule: str
    cold_start_holdout_fraction: float


@dataclass(frozen=True)
class Generator:
    preset: str
    impressions_per_day: int
    seed: int
    users: int
    ads: int


@dataclass(frozen=True)
class Model:
    kind: str
    embedding_dim: int
    ctr_hidden: tuple[int, ...]
    cvr_hidden: tuple[int, ...]
    alpha: float
    dynamic_weight: bool
    domain_params: str
    cvr_loss_weight: float = 0.0  # direct CVR loss on clicked rows, beside the CTCVR one
    wide: bool = False  # MMN: add the domain-composed linear term over the feature ids


@dataclass(frozen=True)
class Training:
    optimizer: str
    learning_rate: float
    batch_size: int
    epochs: int
    shuffle_buffer: int
    read_batch_rows: int
    seed: int
    checkpoint_every_steps: int
    validation_fraction: float
    early_stopping_patience: int
    eval_every_steps: int
    device: str
    initial_accumulator: float = 0.0
    domain_lr_scale: float = 1.0
    domain_weight_decay: float = 0.0  # L2 on the domain-specific parameters only
    checkpoint_retention: int | None = None  # finished checkpoints kept per kind (None: all)


@dataclass(frozen=True)
class Gate:
    metric: str
    min_delta: float
    floor: float
    min_domain_conversions: int
    domain_drop_tolerance: float


@dataclass(frozen=True)
class Evaluation:
    """How holdout metrics are summarized (the gate reads one of them by name)."""

    min_domain_conversions: int = 50  # a domain enters the well-observed average from here
    bootstrap_samples: int = 200  # resamples of each domain's holdout rows for intervals
    confidence: float = 0.95


SSIM_MODES = ("off", "search", "reuse")
SSIM_SELECTOR_INPUTS = ("detached", "shared")


@dataclass(frozen=True)
class Ssim:
    """SSIM shared-instance settings (training.ssim); the YAML's ``ssim:`` section names every
    key. The defaults are the behaviour before the section existed (SSIM off), for bundles
    written before it; they equal the YAML's values (tests/test_ssim.py holds that)."""

    mode: str = "off"  # the daily DAG's default: off | search (then retrain) | reuse (latest set)
    epsilon: float = 0.5  # hard-mask threshold on sigmoid(logit)
    mask_weight: float = 0.05  # lambda of the KL(rho || G) mask term
    target_share: float = 1.0  # rho; 1.0 makes the mask term -sum log sigmoid(logit)
    shared_loss_weight: float = 1.0  # beta, multiplies alpha * the shared CTCVR term
    across_types: bool = False  # targets: other scenarios of the same type (False) or any domain
    selector_hidden: tuple[int, ...] = (64,)
    selector_input: str = "detached"  # detached | shared (selector gradients reach the embedding)
    selector_lr: float = 0.05  # Adam, its own optimizer: the gates must settle within one search
    selector_ema: float = 0.9  # EMA decay of the selector weights used to score (0 = last step)
    epochs: int = 1  # search epochs over the training window
    ratio_grid: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2)
    ratio_metric: str = "cvr_auc_domain_avg"  # validation metric choose_ratio maximizes

    def __post_init__(self) -> None:
        # Checked here (not only in _validate) because searches and benchmarks build
        # variants with dataclasses.replace.
        object.__setattr__(self, "selector_hidden", tuple(int(v) for v in self.selector_hidden))
        object.__setattr__(self, "ratio_grid", tuple(float(v) for v in self.ratio_grid))
        if self.mode not in SSIM_MODES:
            raise ConfigError(f"ssim.mode must be one of {SSIM_MODES}, got {self.mode!r}")
        if not 0.0 < self.epsilon < 1.0:
            raise ConfigError(f"ssim.epsilon must lie in (0, 1), got {self.epsilon}")
        if self.mask_weight < 0 or self.shared_loss_weight < 0:
            raise ConfigError("ssim.mask_weight and ssim.shared_loss_weight must be >= 0")
        if not 0.0 < self.target_share <= 1.0:
            raise ConfigError(f"ssim.target_share must lie in (0, 1], got {self.target_share}")
        if self.selector_input not in SSIM_SELECTOR_INPUTS:
            raise ConfigError(f"ssim.selector_input must be one of {SSIM_SELECTOR_INPUTS}")
        if self.selector_lr <= 0:
            raise ConfigError("ssim.selector_lr must be > 0")
        if not 0.0 <= self.selector_ema < 1.0:
            raise ConfigError("ssim.selector_ema must lie in [0, 1)")
        if self.epochs < 1:
            raise ConfigError("ssim.epochs must be >= 1")
        if not self.ratio_grid or any(not 0.0 <= r <= 1.0 for r in self.ratio_grid):
            raise ConfigError(f"ssim.ratio_grid needs ratios in [0, 1], got {self.ratio_grid}")


@dataclass(frozen=True)
class Validation:
    trailing_days: int
    row_count_tolerance: float
    max_quarantine_share: float
    drift_tolerance: float
    drift_error_factor: float
    drift_min_clicks: int
    max_missing_share: float = 0.5  # a feature missing (id 0) on more of a day's samples is an error
    missing_share_increase: float = 0.2  # error above the trailing days' missing share + this


@dataclass(frozen=True)
class Mlflow:
    tracking_uri: str
    artifact_root: Path
    experiment: str
    registered_model: str


@dataclass(frozen=True)
class Spark:
    master: str
    driver_memory: str
    shuffle_partitions: int
    output_files_per_day: int
    compress_cache: bool = True  # Spark's own default, what jobs ran with before the key
    java_options: str | None = None  # None / empty: the JVM's defaults (G1), as before the key
    event_time_tolerance_minutes: float = 60.0  # event time this far outside its partition's day
    max_lost_bytes_share: float = 0.05  # corrupt files' share of a log's bytes before the day fails

    def jvm_conf(self) -> dict[str, str]:
        """The driver's and executors' JVM options as Spark settings (none when unset)."""
        if not (self.java_options or "").strip():
            return {}
        return {"spark.driver.extraJavaOptions": self.java_options,
                "spark.executor.extraJavaOptions": self.java_options}


@dataclass(frozen=True)
class Airflow:
    schedule: str
    start_date: str
    retries: int
    retry_delay_minutes: int
    spark_timeout_minutes: int
    train_timeout_minutes: int
    parallelism: int


RUNTIME_WAIT_POLICIES = ("active", "passive")


@dataclass(frozen=True)
class Runtime:
    """The thread policy (core.threads): intra-op threads of training, evaluation and serving,
    libgomp's OMP_WAIT_POLICY, the Spark job's cores. ``auto``: the CPUs this process may use
    (cgroup quota, affinity) divided by ``airflow.parallelism``. The defaults are the YAML's,
    for bundles written before the section existed."""

    threads: int | str = "auto"
    omp_wait_policy: str = "passive"
    spark_cores: int | str = "auto"

    def __post_init__(self) -> None:
        for key in ("threads", "spark_cores"):
            value = getattr(self, key)
            if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"runtime.{key} must be 'auto' or an integer >= 1, got {value!r}")
        if self.omp_wait_policy not in RUNTIME_WAIT_POLICIES:
            raise ConfigError(f"runtime.omp_wait_policy must be one of {RUNTIME_WAIT_POLICIES}, "
                              f"got {self.omp_wait_policy!r}")


@dataclass(frozen=True)
class PipelineConfig:
    """The typed, validated pipeline config. ``raw`` keeps the merged mapping for hashing."""

    paths: Paths
    logs: dict[str, LogSpec]
    domains: Domains
    features: tuple[FeatureField, ...]
    hashing: Hashing
    windows: Windows
    generator: Generator
    model: Model
    training: Training
    gate: Gate
    evaluation: Evaluation
    ssim: Ssim
    validation: Validation
    mlflow: Mlflow
    spark: Spark
    airflow: Airflow
    runtime: Runtime
    source: Path
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def feature_columns(self) -> list[str]:
        return [f.column for f in self.features]

    def config_hash(self) -> str:
        """Stable short hash of the effective config, for run tags and manifests."""
        canonical = json.dumps(self.raw, sort_keys=True, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    def with_overrides(self, overrides: Sequence[str] | Mapping[str, Any]) -> PipelineConfig:
        """A copy with ``section.key=value`` overrides applied (validated again)."""
        merged = copy.deepcopy(self.raw)
        _apply_overrides(merged, _parse_overrides(overrides))
        return _build(merged, self.source)

    def to_json(self) -> str:
        return json.dumps(self.raw, sort_keys=True, indent=2, default=str)


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    environ: Mapping[str, str] | None = None,
) -> PipelineConfig:
    """Read the YAML config, apply env and explicit overrides, validate, resolve paths."""
    env = os.environ if environ is None else environ
    config_path = Path(path or env.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_PATH).resolve()
    if not config_path.is_file():
        raise ConfigError(f"config file not found: {config_path}")
    data = yaml.safe_load(config_path.read_text())
    if not isinstance(data, dict):
        raise ConfigError(f"{config_path} must hold a mapping at its top level")
    _apply_overrides(data, _env_overrides(env))
    _apply_overrides(data, _parse_overrides(overrides))
    return _build(data, config_path)


def add_config_arguments(parser: Any) -> Any:
    """``--config`` and repeatable ``--set SECTION.KEY=VALUE`` on an argparse parser, the same
    for every entry point; read them back with ``load_config(args.config, args.overrides)``."""
    parser.add_argument("--config", help="pipeline config YAML (default: conf/pipeline.yaml or $MMN_CONFIG)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable)")
    return parser


def config_from_mapping(data: Mapping[str, Any], source: str | os.PathLike[str] = "<bundle>") -> PipelineConfig:
    """Build a config from an already-merged mapping (e.g. the copy shipped in a model).

    A model bundle written before a key existed lacks it: such keys take their dataclass
    default, which is the behaviour the code had before the key (so today's code can still
    load and gate against an older champion). A YAML file must name every key."""
    return _build(copy.deepcopy(dict(data)), Path(source), from_bundle=True)


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name, value in env.items():
        if name.startswith(ENV_PREFIX) and name.count("__") >= 2:
            dotted = ".".join(part.lower() for part in name[len(ENV_PREFIX):].split("__"))
            found[dotted] = yaml.safe_load(value)
    return found


def _parse_overrides(overrides: Sequence[str] | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(overrides, Mapping):
        return dict(overrides)
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        parsed[key.strip()] = yaml.safe_load(value)
    return parsed


def _apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any]) -> None:
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = data
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                raise ConfigError(f"override {dotted!r}: {part!r} is not a config section")
            node = child
        if leaf not in node:
            raise ConfigError(f"override {dotted!r}: unknown key {leaf!r}")
        node[leaf] = value


def _section(data: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name)
    if not isinstance(value, dict):
        raise ConfigError(f"config section {name!r} is missing or not a mapping")
    return value


def _dataclass_from(cls: type, values: Mapping[str, Any], section: str, from_bundle: bool = False) -> Any:
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    optional = {f.name for f in fields if from_bundle and f.default is not dataclasses.MISSING}
    missing = names - set(values) - optional
    unknown = set(values) - names
    if missing:
        raise ConfigError(f"section {section!r} lacks keys: {sorted(missing)}")
    if unknown:
        raise ConfigError(f"section {section!r} has unknown keys: {sorted(unknown)}")
    return cls(**{k: values[k] for k in names if k in values})


def _resolve(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p if p.is_absolute() else (REPO_ROOT / p).resolve()


def _resolve_sqlite_uri(uri: str) -> str:
    """Make a relative ``sqlite:///rel/path.db`` absolute, so every process agrees on it."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(_resolve(uri[len(prefix):]))
    return uri


def _build(data: dict[str, Any], source: Path, from_bundle: bool = False) -> PipelineConfig:
    paths = _section(data, "paths")
    mlflow_cfg = dict(_section(data, "mlflow"))
    mlflow_cfg["tracking_uri"] = _resolve_sqlite_uri(str(mlflow_cfg.get("tracking_uri", "")))
    mlflow_cfg["artifact_root"] = _resolve(mlflow_cfg.get("artifact_root", "data/mlflow/artifacts"))
    model = dict(_section(data, "model"))
    for key in ("ctr_hidden", "cvr_hidden"):
        model[key] = tuple(int(v) for v in model.get(key, ()))

    def section(cls: type, name: str) -> Any:
        # A bundle older than a whole section takes that section's defaults.
        values = data.get(name, {}) if from_bundle and name not in data else _section(data, name)
        return _dataclass_from(cls, values, name, from_bundle)

    cfg = PipelineConfig(
        paths=Paths(**{k: _resolve(v) for k, v in paths.items()}),
        logs={
            name: LogSpec(id_field=spec["id_field"], required=dict(spec["required"]))
            for name, spec in _section(data, "logs").items()
        },
        domains=section(Domains, "domains"),
        features=tuple(_feature(f) for f in data.get("features") or []),
        hashing=section(Hashing, "hashing"),
        windows=section(Windows, "windows"),
        generator=section(Generator, "generator"),
        model=_dataclass_from(Model, model, "model", from_bundle),
        training=section(Training, "training"),
        gate=section(Gate, "gate"),
        evaluation=section(Evaluation, "evaluation"),
        ssim=section(Ssim, "ssim"),
        validation=section(Validation, "validation"),
        mlflow=_dataclass_from(Mlflow, mlflow_cfg, "mlflow", from_bundle),
        spark=section(Spark, "spark"),
        airflow=section(Airflow, "airflow"),
        runtime=section(Runtime, "runtime"),
        source=source,
        raw=data,
    )
    _validate(cfg)
    return cfg


def _feature(spec: Mapping[str, Any]) -> FeatureField:
    name = spec.get("name")
    kind = spec.get("kind")
    if not name or kind not in ("categorical", "numeric"):
        raise ConfigError(f"feature {spec!r}: needs a name and kind categorical|numeric")
    if kind == "categorical":
        buckets = int(spec.get("buckets", 0))
        if buckets < 2:
            raise ConfigError(f"feature {name!r}: categorical fields need buckets >= 2")
        return FeatureField(name=name, kind=kind, buckets=buckets)
    boundaries = tuple(float(b) for b in spec.get("boundaries") or [])
    if not boundaries or list(boundaries) != sorted(set(boundaries)):
        raise ConfigError(f"feature {name!r}: numeric fields need strictly increasing boundaries")
    return FeatureField(name=name, kind=kind, boundaries=boundaries)


def _validate(cfg: PipelineConfig) -> None:
    if set(cfg.logs) != {"impressions", "clicks", "conversions"}:
        raise ConfigError("logs must define impressions, clicks and conversions")
    if not cfg.features:
        raise ConfigError("at least one feature field is required")
    names = [f.name for f in cfg.features]
    if len(set(names)) != len(names):
        raise ConfigError(f"feature names repeat: {names}")
    if cfg.hashing.algorithm != "xxhash64" or cfg.hashing.seed != SPARK_XXHASH64_SEED:
        raise ConfigError("hashing must be xxhash64 with seed 42 (Spark's fixed xxhash64 seed)")
    try:
        re.compile(cfg.domains.value_pattern)
    except re.error as exc:
        raise ConfigError(f"domains.value_pattern is not a regex: {exc}") from exc
    if cfg.windows.holdout_rule != "latest_day":
        raise ConfigError("windows.holdout_rule supports only 'latest_day'")
    if not 0 < cfg.windows.cold_start_holdout_fraction < 1:
        raise ConfigError("windows.cold_start_holdout_fraction must lie in (0, 1)")
    if cfg.windows.train_window_days < 1:
        raise ConfigError("windows.train_window_days must be >= 1")
    if cfg.model.domain_params not in ("full", "common_only"):
        raise ConfigError("model.domain_params must be full or common_only")
    if cfg.training.optimizer not in ("adagrad", "adam"):
        raise ConfigError("training.optimizer must be adagrad or adam")
    if cfg.training.device not in ("auto", "cpu", "cuda"):
        raise ConfigError("training.device must be auto, cpu or cuda")
    retention = cfg.training.checkpoint_retention
    if retention is not None and (isinstance(retention, bool) or not isinstance(retention, int) or retention < 0):
        raise ConfigError(f"training.checkpoint_retention must be an integer >= 0, got {retention!r}")
