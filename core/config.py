"""Load and validate the pipeline config (conf/pipeline.yaml), the one source of truth.

Every stage calls :func:`load_config`. Overrides come, in increasing precedence, from
environment variables ``MMN__<SECTION>__<KEY>=<yaml value>`` and from ``--set
section.key=value`` pairs given on a command line. Values are parsed as YAML, so
``MMN__TRAINING__EPOCHS=2`` gives an int and ``MMN__MODEL__CVR_HIDDEN=[64,32]`` a list.

Every key is checked when its section is built, so a bad value fails at load naming its key
(``training.epochs: expected an integer, got 'abc'``) instead of deep in a stage after an
MLflow run was opened: each field is coerced to its annotation (int, float, bool, str, Path,
``tuple[X, ...]``, ``X | None``) and then held to its rule in :data:`core.config_checks.RULES` (ranges, choices,
names that must exist). A section checks itself in ``__post_init__``, so a variant built with
``dataclasses.replace`` is checked too. (A small validator rather than pydantic: core is also
imported by the Spark driver and inside served models, where pydantic is not a declared
dependency, and the messages and the strictness, e.g. no bool as int, stay ours.)
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
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


class _Section:
    """Base of the config's sections: each checks its own fields when built (from the YAML, a
    bundle or ``dataclasses.replace``). The section's key is its class name in lower case
    (``Training`` is ``training``)."""

    def __post_init__(self) -> None:
        from core.config_checks import check_section  # the rules import this module's names

        check_section(self)


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
class Paths(_Section):
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
class Domains(_Section):
    type_field: str
    scenario_field: str
    value_pattern: str
    max_types: int
    max_scenarios: int


@dataclass(frozen=True)
class Hashing(_Section):
    algorithm: str
    seed: int


@dataclass(frozen=True)
class Windows(_Section):
    click_window_minutes: int
    attribution_window_hours: int
    label_delay_days: int
    train_window_days: int
    holdout_rule: str
    cold_start_holdout_fraction: float


@dataclass(frozen=True)
class Generator(_Section):
    preset: str
    impressions_per_day: int
    seed: int
    users: int
    ads: int


@dataclass(frozen=True)
class Model(_Section):
    kind: str
    embedding_dim: int
    ctr_hidden: tuple[int, ...]
    cvr_hidden: tuple[int, ...]
    alpha: float
    dynamic_weight: bool
    domain_params: str
    cvr_loss_weight: float = 0.0  # direct CVR loss on clicked rows, beside the CTCVR one
    wide: bool = False  # MMN: add the domain-composed linear term over the feature ids
    wide_fields: tuple[str, ...] = ()  # the feature fields the wide term covers; () = all


@dataclass(frozen=True)
class Training(_Section):
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
    shared_weight_decay: float = 0.0  # L2 on the other parameters (embeddings included)
    checkpoint_retention: int | None = None  # finished checkpoints kept per kind (None: all)


@dataclass(frozen=True)
class Gate(_Section):
    metric: str
    min_delta: float
    floor: float
    min_domain_conversions: int
    domain_drop_tolerance: float


@dataclass(frozen=True)
class Zoo(_Section):
    """Hyperparameters of the zoo's baselines (MMN's own are in ``model``); defaults equal
    conf/pipeline.yaml's, for model bundles saved before the section existed."""

    mmoe_experts: int = 4
    ple_shared_experts: int = 2
    ple_specific_experts: int = 1
    dpg_rank: int = 4
    dpg_generator_hidden: int = 16
    mi_dpg_weight: float = 0.1
    mi_dpg_discriminator_hidden: int = 32
    mi_dpg_rows: int = 512  # rows per batch the MI discriminator scores (caps its cost)


@dataclass(frozen=True)
class Evaluation(_Section):
    """How holdout metrics are summarized (the gate reads one of them by name)."""

    min_domain_conversions: int = 50  # a domain enters the well-observed average from here
    bootstrap_samples: int = 200  # resamples of each domain's holdout rows for intervals
    confidence: float = 0.95


SSIM_MODES = ("off", "search", "reuse")
SSIM_SELECTOR_INPUTS = ("detached", "shared")


@dataclass(frozen=True)
class Ssim(_Section):
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


@dataclass(frozen=True)
class Validation(_Section):
    trailing_days: int
    row_count_tolerance: float
    max_quarantine_share: float
    drift_tolerance: float
    drift_error_factor: float
    drift_min_clicks: int
    max_missing_share: float = 0.5  # a feature missing (id 0) on more of a day's samples is an error
    missing_share_increase: float = 0.2  # error above the trailing days' missing share + this


@dataclass(frozen=True)
class Mlflow(_Section):
    tracking_uri: str
    artifact_root: Path
    experiment: str
    registered_model: str


@dataclass(frozen=True)
class Spark(_Section):
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
class Serving(_Section):
    """The model server's settings (``serving:``). The default is the limit serving.pyfunc
    applied before the section existed, for bundles written without it."""

    max_request_records: int = 50_000  # records one request may hold; a larger one is refused
    tower_cache_mb: int = 64  # MMN's cache of composed per-domain towers, bytes-bounded LRU


@dataclass(frozen=True)
class Airflow(_Section):
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
    zoo: Zoo
    training: Training
    gate: Gate
    evaluation: Evaluation
    ssim: Ssim
    validation: Validation
    mlflow: Mlflow
    spark: Spark
    airflow: Airflow
    runtime: Runtime
    serving: Serving
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
        apply_overrides(merged, parse_overrides(overrides))
        return _build(merged, self.source)

    def to_json(self) -> str:
        return json.dumps(self.raw, sort_keys=True, indent=2, default=str)

    def source_overrides(self) -> list[str]:
        """``section.key=value`` overrides that turn the file at ``source`` into this config.

        What a child process needs, beside ``--config source``, to run with this effective
        config (env and ``--set`` overrides included) whatever its own environment: e.g. the
        Spark build job under spark-submit. ``load_config(source, overrides=<these>)`` has
        the same :meth:`config_hash`."""
        if not self.source.is_file():
            raise ConfigError(f"config {self.source} is not a file: no overrides relative to it")
        base = yaml.safe_load(self.source.read_text())
        return [f"{key}={yaml_text(value)}" for key, value in differences(base, self.raw)]


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
    apply_overrides(data, env_overrides(env))
    apply_overrides(data, parse_overrides(overrides))
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
    mlflow_cfg = dict(_section(data, "mlflow"))
    if isinstance(mlflow_cfg.get("tracking_uri"), str):
        mlflow_cfg["tracking_uri"] = _resolve_sqlite_uri(mlflow_cfg["tracking_uri"])
    mlflow_cfg.setdefault("artifact_root", "data/mlflow/artifacts")

    def section(cls: type, name: str) -> Any:
        # A bundle older than a whole section takes that section's defaults.
        values = data.get(name, {}) if from_bundle and name not in data else _section(data, name)
        return _dataclass_from(cls, values, name, from_bundle)

    features = data.get("features") or []
    if not isinstance(features, list):
        raise ConfigError(f"features: expected a list of fields, got {short_repr(features)}")
    cfg = PipelineConfig(
        paths=section(Paths, "paths"),
        logs={str(name): _log_spec(name, spec) for name, spec in _section(data, "logs").items()},
        domains=section(Domains, "domains"),
        features=tuple(_feature(f, i) for i, f in enumerate(features)),
        hashing=section(Hashing, "hashing"),
        windows=section(Windows, "windows"),
        generator=section(Generator, "generator"),
        model=section(Model, "model"),
        zoo=section(Zoo, "zoo"),
        training=section(Training, "training"),
        gate=section(Gate, "gate"),
        evaluation=section(Evaluation, "evaluation"),
        ssim=section(Ssim, "ssim"),
        validation=section(Validation, "validation"),
        mlflow=_dataclass_from(Mlflow, mlflow_cfg, "mlflow", from_bundle),
        spark=section(Spark, "spark"),
        airflow=section(Airflow, "airflow"),
        runtime=section(Runtime, "runtime"),
        serving=section(Serving, "serving"),
        source=source,
        raw=data,
    )
    _validate(cfg)
    return cfg


def _log_spec(name: Any, spec: Any) -> LogSpec:
    key = f"logs.{name}"
    if not isinstance(spec, Mapping) or set(spec) != {"id_field", "required"}:
        raise ConfigError(f"{key}: expected a mapping with id_field and required, got {short_repr(spec)}")
    id_field = coerce(spec["id_field"], str, f"{key}.id_field")
    required = coerce(spec["required"], dict[str, str], f"{key}.required")
    if not id_field or id_field not in required:
        raise ConfigError(f"{key}.id_field: must name one of the required fields, got {id_field!r}")
    return LogSpec(id_field=id_field, required=required)


def _feature(spec: Any, index: int) -> FeatureField:
    if not isinstance(spec, Mapping):
        raise ConfigError(f"features[{index}]: expected a mapping, got {short_repr(spec)}")
    name = spec.get("name")
    kind = spec.get("kind")
    if not isinstance(name, str) or not name or kind not in ("categorical", "numeric"):
        raise ConfigError(f"feature {spec!r}: needs a name and kind categorical|numeric")
    key = f"features[{name}]"
    unknown = set(spec) - {"name", "kind", "buckets" if kind == "categorical" else "boundaries"}
    if unknown:
        raise ConfigError(f"{key}: unknown keys for a {kind} field: {sorted(unknown)}")
    if kind == "categorical":
        buckets = coerce(spec.get("buckets", 0), int, f"{key}.buckets")
        if buckets < 2:
            raise ConfigError(f"feature {name!r}: categorical fields need buckets >= 2")
        return FeatureField(name=name, kind=kind, buckets=buckets)
    boundaries = coerce(spec.get("boundaries") or (), tuple[float, ...], f"{key}.boundaries")
    if not boundaries or list(boundaries) != sorted(set(boundaries)):
        raise ConfigError(f"feature {name!r}: numeric fields need strictly increasing boundaries")
    return FeatureField(name=name, kind=kind, boundaries=boundaries)


def _validate(cfg: PipelineConfig) -> None:
    """Checks across keys (each key alone was checked when its section was built)."""
    if set(cfg.logs) != {"impressions", "clicks", "conversions"}:
        raise ConfigError("logs must define impressions, clicks and conversions")
    if not cfg.features:
        raise ConfigError("at least one feature field is required")
    names = [f.name for f in cfg.features]
    if len(set(names)) != len(names):
        raise ConfigError(f"feature names repeat: {names}")
    unknown = [f for f in cfg.model.wide_fields if f not in names]
    if len(set(cfg.model.wide_fields)) != len(cfg.model.wide_fields):
        raise ConfigError(f"model.wide_fields repeat: {list(cfg.model.wide_fields)}")
    if unknown:
        raise ConfigError(f"model.wide_fields: {unknown} are not feature fields (features: {names})")


# At the end: these modules import this module's names (ConfigError, the section constants).
from core.config_checks import coerce, short_repr  # noqa: E402
from core.overrides import apply_overrides, differences, env_overrides, parse_overrides, yaml_text  # noqa: E402
