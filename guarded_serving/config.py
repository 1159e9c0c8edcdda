"""The serving config: YAML, validated once when loaded, every error naming its key.

Paths are relative to the config file. Defaults live here and only here.

```yaml
name: diamonds-price
task: regression
primary: {path: primary.onnx}          # or {bentoml_tag: "diamonds:latest"}, {callable: "mod:fn"}
fallback: {path: fallback.onnx}
profile: profile.json
latency_budget_ms: 50
max_rows: 1000
policy: {range_margin: 0.0}
tracing: {endpoint: "http://127.0.0.1:4318/v1/traces", protocol: http/protobuf}
store: {url: "sqlite:///guarded-serving.sqlite3"}
```
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .policy import Policy


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from: a file, a BentoML model-store tag, or ``module:function``."""

    path: Path | None = None
    bentoml_tag: str | None = None
    callable: str | None = None
    trusted: bool = False
    name: str | None = None
    version: str | None = None


@dataclass(frozen=True)
class TracingConfig:
    #: OTLP endpoint; None: export nothing from the config (BentoML's or OTEL_* settings may apply).
    endpoint: str | None = None
    protocol: str = "http/protobuf"  # or "grpc"
    sample_rate: float = 1.0
    service_name: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StoreConfig:
    #: SQLAlchemy URL; default: SQLite file beside the config (or GUARDED_SERVING_STORE_URL).
    url: str = ""
    flush_seconds: float = 5.0
    #: Put before every table name, so several models (or environments) can share one database.
    table_prefix: str = "gs_"
    #: Connect and statement timeout (s): a silent database is a fast 503 on the monitoring routes.
    timeout_seconds: float = 3.0


@dataclass(frozen=True)
class DriftConfig:
    enabled: bool = True
    window_rows: int = 1000
    window_seconds: float | None = None
    min_rows: int = 200
    consecutive_windows_for_retrain: int = 3
    webhook_url: str | None = None
    #: GET /drift reuses a view this young (s); concurrent callers share one evaluation.
    view_cache_seconds: float = 1.0


@dataclass(frozen=True)
class PredictionLogConfig:
    enabled: bool = True
    shadow_fallback: bool = True
    #: Also run the primary on rows sent to the fallback, so outcomes show whether routing helped.
    shadow_primary: bool = True
    log_features: bool = True
    retention_days: float = 30.0
    queue_size: int = 10000
    batch_size: int = 500
    #: The recorder writes what waits at least this often (s): the most a crash can lose by default.
    flush_seconds: float = 1.0
    #: Share of requests whose rows are logged (drift counting always sees every row).
    sample_rate: float = 1.0
    #: Acknowledge /predict only once its rows are committed (group commit across requests).
    durable: bool = False


@dataclass(frozen=True)
class AuthConfig:
    token_env: str = "GUARDED_SERVING_TOKEN"
    protect_predict: bool = False


@dataclass(frozen=True)
class ServingConfig:
    name: str
    task: str
    primary: ModelSpec
    fallback: ModelSpec
    profile: Path
    latency_budget_ms: float | None = None
    max_rows: int = 1000
    policy: Policy = field(default_factory=Policy)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    prediction_log: PredictionLogConfig = field(default_factory=PredictionLogConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    source: Path | None = None


_TOP_REQUIRED = ("name", "task", "primary", "fallback", "profile")


def load_config(path: str | Path) -> ServingConfig:
    """Read and validate a serving config file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read serving config {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"serving config {path} is not valid YAML: {e}") from e
    try:
        return parse_config(raw, base=path.parent.resolve(), source=path.resolve())
    except ConfigError as e:
        raise ConfigError(f"{path}: {e.message}") from e


def parse_config(raw: Any, base: Path, source: Path | None = None) -> ServingConfig:
    if not isinstance(raw, dict):
        raise ConfigError("the serving config must be a mapping of keys to values")
    missing = [k for k in _TOP_REQUIRED if k not in raw]
    if missing:
        raise ConfigError(f"missing required key(s): {', '.join(missing)}")
    known = {f.name for f in fields(ServingConfig)} - {"source"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown}; known keys are {sorted(known)}")
    task = raw["task"]
    if task not in ("regression", "classification"):
        raise ConfigError(f"task: must be 'regression' or 'classification', got {task!r}")
    name = raw["name"]
    if not isinstance(name, str) or not name:
        raise ConfigError(f"name: must be a non-empty string, got {name!r}")
    profile = _path(raw["profile"], base, "profile")
    if not profile.exists():
        raise ConfigError(f"profile: file {profile} does not exist")
    budget = raw.get("latency_budget_ms")
    if budget is not None and (not _is_number(budget) or budget <= 0):
        raise ConfigError(f"latency_budget_ms: must be a positive number or null, got {budget!r}")
    max_rows = raw.get("max_rows", 1000)
    if not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 1:
        raise ConfigError(f"max_rows: must be a positive integer, got {max_rows!r}")
    policy_raw = raw.get("policy") or {}
    if not isinstance(policy_raw, dict):
        raise ConfigError("policy: must be a mapping")
    try:
        policy = Policy.from_dict(policy_raw)
    except ConfigError as e:
        raise ConfigError(f"policy: {e.message}") from e
    store = _section(raw, "store", StoreConfig)
    if not store.url:
        url = os.environ.get("GUARDED_SERVING_STORE_URL") or f"sqlite:///{base / 'guarded-serving.sqlite3'}"
        store = StoreConfig(url=url, flush_seconds=store.flush_seconds, table_prefix=store.table_prefix,
                            timeout_seconds=store.timeout_seconds)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,40}", store.table_prefix):
        raise ConfigError(f"store.table_prefix: must be letters, digits and _, got {store.table_prefix!r}")
    if store.flush_seconds <= 0:
        raise ConfigError(f"store.flush_seconds: must be positive, got {store.flush_seconds!r}")
    tracing = _section(raw, "tracing", TracingConfig)
    if tracing.protocol not in ("http/protobuf", "grpc"):
        raise ConfigError(f"tracing.protocol: must be 'http/protobuf' or 'grpc', got {tracing.protocol!r}")
    if not 0.0 <= tracing.sample_rate <= 1.0:
        raise ConfigError(f"tracing.sample_rate: must be between 0 and 1, got {tracing.sample_rate!r}")
    return ServingConfig(
        name=name,
        task=task,
        primary=_model(raw["primary"], base, "primary"),
        fallback=_model(raw["fallback"], base, "fallback"),
        profile=profile,
        latency_budget_ms=float(budget) if budget is not None else None,
        max_rows=max_rows,
        policy=policy,
        tracing=tracing,
        store=store,
        drift=_section(raw, "drift", DriftConfig),
        prediction_log=_section(raw, "prediction_log", PredictionLogConfig),
        auth=_section(raw, "auth", AuthConfig),
        source=source,
    )


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _path(v: Any, base: Path, key: str) -> Path:
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{key}: must be a file path, got {v!r}")
    p = Path(os.path.expandvars(v)).expanduser()
    return p if p.is_absolute() else (base / p)


def _model(v: Any, base: Path, key: str) -> ModelSpec:
    if isinstance(v, str):
        v = {"path": v}
    if not isinstance(v, dict):
        raise ConfigError(f"{key}: must be a mapping with path, bentoml_tag or callable")
    allowed = {f.name for f in fields(ModelSpec)}
    unknown = sorted(set(v) - allowed)
    if unknown:
        raise ConfigError(f"{key}: unknown key(s) {unknown}; known keys are {sorted(allowed)}")
    given = [k for k in ("path", "bentoml_tag", "callable") if v.get(k)]
    if len(given) != 1:
        raise ConfigError(f"{key}: give exactly one of path, bentoml_tag or callable (got {given or 'none'})")
    path = None
    if v.get("path"):
        path = _path(v["path"], base, f"{key}.path")
        if not path.exists():
            raise ConfigError(f"{key}.path: file {path} does not exist")
    trusted = v.get("trusted", False)
    if not isinstance(trusted, bool):
        raise ConfigError(f"{key}.trusted: must be true or false, got {trusted!r}")
    return ModelSpec(
        path=path,
        bentoml_tag=v.get("bentoml_tag"),
        callable=v.get("callable"),
        trusted=trusted,
        name=v.get("name"),
        version=None if v.get("version") is None else str(v.get("version")),
    )


def _section(raw: dict[str, Any], key: str, cls: type) -> Any:
    v = raw.get(key)
    if v is None:
        return cls()
    if not isinstance(v, dict):
        raise ConfigError(f"{key}: must be a mapping")
    defaults = cls()
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(v) - set(known))
    if unknown:
        raise ConfigError(f"{key}: unknown key(s) {unknown}; known keys are {sorted(known)}")
    for k, value in v.items():
        default = getattr(defaults, k)
        if value is None and default is None:
            continue
        expected: tuple[type, ...]
        if isinstance(default, bool):
            expected = (bool,)
        elif isinstance(default, (int, float)) or default is None and k.endswith(("seconds", "rows")):
            expected = (int, float)
        elif isinstance(default, dict):
            expected = (dict,)
        else:
            expected = (str,)
        if not isinstance(value, expected) or (bool not in expected and isinstance(value, bool)):
            names = " or ".join(t.__name__ for t in expected)
            raise ConfigError(f"{key}.{k}: must be {names}, got {value!r}")
        if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float):
            raise ConfigError(f"{key}.{k}: must be an integer, got {value!r}")
    return cls(**v)
