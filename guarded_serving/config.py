"""The serving config: one declared schema, validated once when loaded, every problem reported at once.

Each field carries its default and its limits (``Annotated[int, Gt(0)]``), in the manner of
BentoML's own ``service/config.py``; this module is the one place they live. Paths are relative to
the config file.

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
limits: {max_body_bytes: 4194304}
auth: {protect_metrics: true}
```

>>> from pathlib import Path
>>> c = parse_config({"name": "m", "task": "regression", "primary": {"callable": "m:f"},
...                   "fallback": {"callable": "m:g"}, "profile": "README.md",
...                   "drift": {"min_rows": 0}}, base=Path("."))
Traceback (most recent call last):
...
guarded_serving.errors.ConfigError: drift.min_rows: must be greater than 0, got 0
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from annotated_types import Ge, Gt, Le
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from .errors import ConfigError, Problem
from .feedback import OUTCOME_RANGE_MARGIN
from .policy import Policy
from .profile import Profile
from .retrain import RetrainSpec

DATA_DIR_ENV = "GUARDED_SERVING_DATA_DIR"
STORE_URL_ENV = "GUARDED_SERVING_STORE_URL"


def _resolve(v: Any, info: ValidationInfo) -> Any:
    """A path from the config, relative to the config file's directory."""
    if v is None or isinstance(v, Path):
        return v
    if not isinstance(v, str) or not v:
        raise ValueError(f"must be a file path, got {v!r}")
    p = Path(os.path.expandvars(v)).expanduser()
    base = (info.context or {}).get("base", Path("."))
    return p if p.is_absolute() else Path(base) / p


def _exists(p: Path | None) -> Path | None:
    if p is not None and not p.exists():
        raise ValueError(f"file {p} does not exist")
    return p


def _text(v: Any) -> Any:
    return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def _policy(v: Any) -> Policy:
    if isinstance(v, Policy):
        return v
    if v is not None and not isinstance(v, dict):
        raise ValueError("must be a mapping")
    try:
        return Policy.from_dict(v)
    except ConfigError as e:
        raise ValueError(e.message) from None


def _names(v: Any) -> tuple[str, ...]:
    """One column name or a list of them, as a tuple."""
    if v is None or v == "":
        return ()
    if isinstance(v, str):
        return (v,)
    if isinstance(v, (list, tuple)) and all(isinstance(x, str) and x for x in v):
        return tuple(v)
    raise ValueError(f"must be a column name or a list of them, got {v!r}")


def _retrain(v: Any, info: ValidationInfo) -> RetrainSpec | None:
    if v is None or isinstance(v, RetrainSpec):
        return v
    try:
        name = re.sub(r"[^A-Za-z0-9._-]", "_", str(info.data.get("name", "model")))
        return RetrainSpec.from_dict(v, base=Path((info.context or {}).get("base", ".")),
                                     default_workdir=data_dir() / name / "retrain")
    except ConfigError as e:
        raise ValueError(e.message.removeprefix("retrain: ")) from None


File = Annotated[Path, BeforeValidator(_resolve), AfterValidator(_exists)]
PositiveInt = Annotated[int, Gt(0)]
PositiveFloat = Annotated[float, Gt(0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ModelSpec(_Section):
    """Where a model comes from: a file, a BentoML model-store tag, or ``module:function``."""

    path: Annotated[Path | None, BeforeValidator(_resolve), AfterValidator(_exists)] = None
    bentoml_tag: str | None = None
    callable: Annotated[str | None, Field(pattern=r"^[\w.]+:[\w.]+$")] = None
    #: Pickle/joblib files execute code when loaded: they load only when marked trusted.
    trusted: bool = False
    name: str | None = None
    version: Annotated[str | None, BeforeValidator(_text)] = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        return {"path": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        given = [k for k in ("path", "bentoml_tag", "callable") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of path, bentoml_tag or callable (got {given or 'none'})")
        return self


class ChallengerSpec(ModelSpec):
    """A model scored in shadow beside the primary (see challenger.py), and what ``promote`` makes
    the primary: its model, the profile its checks use (default: the primary's), and the share of
    answered rows it scores."""

    profile: Annotated[Path | None, BeforeValidator(_resolve), AfterValidator(_exists)] = None
    sample_rate: Annotated[float, Ge(0.0), Le(1.0)] = 1.0


class AutoPromoteConfig(_Section):
    """Promote the challenger by itself once, on at least ``min_outcomes`` logged outcomes, the
    bootstrap interval of its improvement over the guarded service lies above ``margin``."""

    enabled: bool = False
    min_outcomes: PositiveInt = 500
    margin: Annotated[float, Ge(0)] = 0.0


class TracingConfig(_Section):
    #: OTLP endpoint; None: export nothing from the config (BentoML's or OTEL_* settings may apply).
    endpoint: str | None = None
    protocol: Literal["http/protobuf", "grpc"] = "http/protobuf"
    sample_rate: Annotated[float, Ge(0.0), Le(1.0)] = 1.0
    service_name: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)


class StoreConfig(_Section):
    #: SQLAlchemy URL. Default: $GUARDED_SERVING_STORE_URL, else a SQLite file named for the model
    #: in the data directory (see ``data_dir``), never beside the config or the models.
    url: str = ""
    flush_seconds: PositiveFloat = 5.0
    #: Put before every table name, so several models (or environments) can share one database.
    table_prefix: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,40}$")] = "gs_"
    #: Connect and statement timeout (s): a silent database is a fast 503 on the monitoring routes.
    timeout_seconds: PositiveFloat = 3.0


class DriftConfig(_Section):
    enabled: bool = True
    window_rows: PositiveInt = 1000
    window_seconds: PositiveFloat | None = None
    min_rows: PositiveInt = 200
    consecutive_windows_for_retrain: PositiveInt = 3
    webhook_url: str | None = None
    #: GET /drift reuses a view this young (s); concurrent callers share one evaluation.
    view_cache_seconds: Annotated[float, Ge(0)] = 1.0


class PredictionLogConfig(_Section):
    enabled: bool = True
    shadow_fallback: bool = True
    #: Also run the primary on rows sent to the fallback, so outcomes show whether routing helped.
    shadow_primary: bool = True
    log_features: bool = True
    retention_days: Annotated[float, Ge(0)] = 30.0
    #: Rows queued for the recorder (plus rows in flight in its process); beyond it batches are
    #: dropped and counted. Ten lots of ``batch_size``: a slow store fills it, a busy one does not.
    queue_size: PositiveInt = 50000
    #: The recorder processes (and writes) what waits once this many rows wait, else every
    #: ``flush_seconds``. Each lot costs a fixed part (a transaction, a log body, a call per
    #: model and per column): per 1,000 served rows, lots of 1,000 rows cost 6.0 ms of CPU,
    #: lots of 4,000 4.1 and lots of 10,000 3.8 (README, Benchmarks).
    batch_size: PositiveInt = 5000
    #: The recorder writes what waits at least this often (s): the most a crash can lose by default.
    flush_seconds: PositiveFloat = 1.0
    #: Share of requests whose rows are logged (drift counting always sees every row).
    sample_rate: Annotated[float, Ge(0.0), Le(1.0)] = 1.0
    #: Acknowledge /predict only once its rows are committed (group commit across requests).
    durable: bool = False
    #: Record (shadows, drift counts, estimate tallies, the log) in a process of its own beside
    #: each worker rather than in a thread of it, so monitoring does not take the worker's GIL
    #: (recorder_process.py). The service's default; in-process ``ServingRuntime`` uses a thread.
    recorder_process: bool = True


class AuthConfig(_Section):
    """Who may call what. When ``$token_env`` is set, every route needs it as a bearer token
    except those left public here: ``/predict``, ``/livez``/``/readyz`` and ``/metrics``."""

    token_env: Annotated[str, Field(min_length=1)] = "GUARDED_SERVING_TOKEN"
    protect_predict: bool = False
    #: ``/livez``, ``/readyz`` (and BentoML's ``/healthz``).
    protect_health: bool = False
    protect_metrics: bool = False
    #: Failed token checks a client (by address) may make per window before it gets 429s.
    max_failures: PositiveInt = 10
    failure_window_seconds: PositiveFloat = 60.0


class LimitsConfig(_Section):
    """What one request may hold; beyond it the answer is a 4xx before the work is done."""

    #: Request body size; larger bodies get 413 before they are read.
    max_body_bytes: PositiveInt = 4 * 1024 * 1024
    #: Characters in any one string of a body (a category, an id).
    max_string_length: PositiveInt = 1000
    #: Nesting of arrays and objects in a body ({"rows": [{...}]} is 3).
    max_json_depth: Annotated[int, Ge(3), Le(500)] = 32
    #: Time a client has to send a request's line and headers before the connection is closed.
    header_timeout_seconds: PositiveFloat = 10.0


class FeedbackConfig(_Section):
    #: Regression outcomes must lie within the training target's [min, max] widened by this many
    #: times its range on each side (live outcomes may well leave the training range, as rows do:
    #: the default keeps them and refuses only the implausible); null: any finite number.
    outcome_range_margin: Annotated[float, Ge(0)] | None = OUTCOME_RANGE_MARGIN


class EstimationConfig(_Section):
    """Live performance estimates per drift window (needs the profile's estimation artefacts,
    ``guarded-serving profile --holdout``, and drift monitoring, whose windows they share)."""

    enabled: bool = True
    #: Share of served rows the error models (or calibration) estimate, drawn uniformly at random
    #: per row; flagged rows are always estimated (their own scope). The estimates stay unbiased
    #: and their bands are those of the rows estimated; each estimated row costs about what the
    #: primary costs on the example (two error models per role). Below 1, a window needs
    #: ``drift.min_rows / sample_rate`` served rows before its estimate may alert.
    sample_rate: Annotated[float, Gt(0.0), Le(1.0)] = 1.0
    #: Alert (drift.webhook_url) when a role's estimate in the current window is worse than the
    #: profile's holdout baseline by more than this share of it (0.2: MAE 20% above the baseline,
    #: accuracy 20% below it); null: no alert.
    alert_margin: Annotated[float, Gt(0)] | None = 0.2


class ServingConfig(_Section):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, arbitrary_types_allowed=True)

    name: Annotated[str, Field(min_length=1, max_length=200)]
    task: Literal["regression", "classification"]
    primary: ModelSpec
    fallback: ModelSpec
    profile: File
    latency_budget_ms: PositiveFloat | None = None
    max_rows: PositiveInt = 1000
    policy: Annotated[Policy, PlainValidator(_policy)] = Field(default_factory=Policy)
    tracing: TracingConfig = Field(default_factory=TracingConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    prediction_log: PredictionLogConfig = Field(default_factory=PredictionLogConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    estimation: EstimationConfig = Field(default_factory=EstimationConfig)
    #: Columns that are the time of a row, not range-checked nor in the outlier score (see
    #: ``policy.Policy.time_index``): a name or a list of names.
    time_index: Annotated[tuple[str, ...], BeforeValidator(_names)] = ()
    #: How to retrain the primary on production data (``guarded-serving retrain``); see retrain.py.
    retrain: Annotated[RetrainSpec | None, PlainValidator(_retrain)] = None
    #: A model run in shadow on live traffic, the one ``promote`` makes the primary.
    challenger: ChallengerSpec | None = None
    auto_promote: AutoPromoteConfig = Field(default_factory=AutoPromoteConfig)
    #: The file this config was read from (set by ``load_config``, not a key of the file).
    source: Path | None = Field(default=None, exclude=True)


def data_dir() -> Path:
    """Where guarded-serving keeps its files by default: ``$GUARDED_SERVING_DATA_DIR``, else
    ``$XDG_DATA_HOME/guarded-serving``, else ``~/.local/share/guarded-serving``."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share") / "guarded-serving"


def default_store_url(name: str) -> str:
    """``$GUARDED_SERVING_STORE_URL``, else a SQLite file named for the model in ``data_dir()``
    (created here, on first use)."""
    env = os.environ.get(STORE_URL_ENV)
    if env:
        return env
    d = data_dir()
    d.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{d / re.sub(r'[^A-Za-z0-9._-]', '_', name)}.sqlite3"


def load_config(path: str | Path) -> ServingConfig:
    """Read and validate a serving config file; a ConfigError lists every problem, by key."""
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
        raise ConfigError(f"{path}: {e.message}", e.problems) from e


def parse_config(raw: Any, base: Path, source: Path | None = None) -> ServingConfig:
    """Validate a config mapping (paths relative to ``base``)."""
    if not isinstance(raw, dict):
        raise ConfigError("the serving config must be a mapping of keys to values")
    raw = dict(raw)
    stray = ["source"] if "source" in raw else []
    raw.pop("source", None)
    try:
        config = ServingConfig.model_validate(raw, context={"base": base})
        problems = []
    except ValidationError as e:
        problems = [_problem(err) for err in e.errors()]
    problems += [Problem(problem=f"unknown key; known keys are {_known(())}", column=k) for k in stray]
    if problems:
        lines = [f"{p.column}: {p.problem}" for p in problems]
        raise ConfigError("; ".join(lines) if len(lines) == 1 else
                          f"{len(lines)} problems: " + "; ".join(lines), problems)
    update: dict[str, Any] = {"source": source}
    policy = config.policy.with_time_index(config.time_index)
    if policy.features or policy.time_index:  # names must be the profile's features
        try:
            policy.require_features(Profile.load(config.profile).feature_names)
        except ConfigError as e:
            raise ConfigError(f"policy: {e.message}", e.problems) from e
    update["policy"], update["time_index"] = policy, policy.time_index
    if not config.store.url:
        update["store"] = config.store.model_copy(update={"url": default_store_url(config.name)})
    return config.model_copy(update=update)


def _problem(err: Any) -> Problem:
    """One pydantic error as a Problem naming the key (``drift.min_rows``)."""
    loc = tuple(str(x) for x in err["loc"] if not str(x).startswith("function-"))
    key = ".".join(loc) or "(config)"
    kind = err["type"]
    if kind == "missing":
        return Problem(problem="required key missing", column=key)
    if kind == "extra_forbidden":
        return Problem(problem=f"unknown key; known keys are {_known(loc[:-1])}", column=key)
    msg = str(err["msg"]).removeprefix("Value error, ").replace("Input should be", "must be")
    got = err.get("input")
    if kind != "value_error" and not isinstance(got, dict):
        msg += f", got {got!r}"
    return Problem(problem=msg, column=key, got=None if isinstance(got, (dict, list)) else got)


def _known(loc: tuple[str, ...]) -> list[str]:
    model: Any = ServingConfig
    for part in loc:
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return sorted(k for k in model.model_fields if k != "source")
