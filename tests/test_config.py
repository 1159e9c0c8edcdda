import pytest
import yaml

from guarded_serving.config import load_config
from guarded_serving.errors import ConfigError

from ._data import CONFIG, EXAMPLE


def _write(tmp_path, **changes):
    raw = yaml.safe_load(CONFIG.read_text())
    for k, v in changes.items():
        if v is None:
            raw.pop(k, None)
        else:
            raw[k] = v
    raw["profile"] = str(EXAMPLE / "profile.json")
    raw["primary"] = raw.get("primary") if changes.get("primary") else {"path": str(EXAMPLE / "primary.onnx")}
    raw["fallback"] = {"path": str(EXAMPLE / "fallback.onnx")}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_example_config_loads() -> None:
    c = load_config(CONFIG)
    assert c.name == "diamonds-price" and c.task == "regression"
    assert c.primary.path == EXAMPLE / "primary.onnx"
    assert c.store.url.startswith("sqlite:///")
    assert c.max_rows == 1000 and c.latency_budget_ms == 250


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"task": "ranking"}, "task: must be 'regression' or 'classification'"),
        ({"name": None}, "name: required key missing"),
        ({"latency_budget_ms": -1}, "latency_budget_ms: must be greater than 0"),
        ({"max_rows": "many"}, "max_rows: must be a valid integer"),
        ({"policy": {"range_margn": 0.1}}, "unknown policy key"),
        ({"policy": {"range_margin": "wide"}}, "policy.range_margin"),
        ({"tracing": {"protocol": "smoke"}}, "tracing.protocol"),
        ({"drift": {"window_rows": "x"}}, "drift.window_rows"),
        ({"colour": 1}, "colour: unknown key"),
        ({"drift": {"min_rows": 0}}, "drift.min_rows: must be greater than 0"),
        ({"drift": {"window_rows": 0}}, "drift.window_rows: must be greater than 0"),
        ({"prediction_log": {"queue_size": -5}}, "prediction_log.queue_size: must be greater than 0"),
        ({"limits": {"max_json_depth": 1}}, "limits.max_json_depth"),
        ({"auth": {"protect_metrics": "yes"}}, "auth.protect_metrics: must be a valid boolean"),
        ({"store": {"table_prefix": "x;drop"}}, "store.table_prefix"),
        ({"primary": {"path": "nope.onnx"}}, "primary.path: file .* does not exist"),
        ({"primary": {"path": str(EXAMPLE / "primary.onnx"), "callable": "m:f"}}, "primary: give exactly one of"),
    ],
)
def test_errors_name_the_key(tmp_path, changes, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, **changes))


def test_not_yaml(tmp_path) -> None:
    (tmp_path / "c.yaml").write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "c.yaml")


def test_every_problem_is_reported_at_once(tmp_path) -> None:
    path = _write(tmp_path, task="ranking", max_rows=0, drift={"min_rows": 0, "colour": 1})
    with pytest.raises(ConfigError) as e:
        load_config(path)
    keys = {p.column for p in e.value.problems}
    assert keys == {"task", "max_rows", "drift.min_rows", "drift.colour"}
    assert "4 problems" in e.value.message


def test_all_defaults_are_kept(tmp_path) -> None:
    c = load_config(_write(tmp_path, store=None, drift=None, prediction_log=None, auth=None, tracing=None))
    assert (c.drift.window_rows, c.drift.min_rows, c.drift.consecutive_windows_for_retrain) == (1000, 200, 3)
    assert (c.prediction_log.queue_size, c.prediction_log.batch_size, c.prediction_log.retention_days) == (50000, 5000, 30.0)
    assert c.store.flush_seconds == 5.0 and c.store.table_prefix == "gs_"
    assert c.auth.token_env == "GUARDED_SERVING_TOKEN" and not c.auth.protect_predict
    assert c.tracing.protocol == "http/protobuf" and c.tracing.sample_rate == 1.0
    assert c.limits.max_body_bytes == 4 * 1024 * 1024 and c.limits.max_json_depth == 32


def test_default_store_is_in_the_data_dir_not_beside_the_config(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("GUARDED_SERVING_STORE_URL", raising=False)
    monkeypatch.setenv("GUARDED_SERVING_DATA_DIR", str(tmp_path / "data"))
    c = load_config(_write(tmp_path, store=None))
    assert c.store.url == f"sqlite:///{tmp_path / 'data' / 'diamonds-price.sqlite3'}"
    assert (tmp_path / "data").is_dir()
    monkeypatch.delenv("GUARDED_SERVING_DATA_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert load_config(_write(tmp_path, store=None)).store.url.startswith(f"sqlite:///{tmp_path / 'xdg' / 'guarded-serving'}")
    monkeypatch.setenv("GUARDED_SERVING_STORE_URL", "sqlite:///elsewhere.sqlite3")
    assert load_config(_write(tmp_path, store=None)).store.url == "sqlite:///elsewhere.sqlite3"
