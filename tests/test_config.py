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
        ({"name": None}, "missing required key.*name"),
        ({"latency_budget_ms": -1}, "latency_budget_ms: must be a positive number"),
        ({"max_rows": "many"}, "max_rows: must be a positive integer"),
        ({"policy": {"range_margn": 0.1}}, "unknown policy key"),
        ({"policy": {"range_margin": "wide"}}, "policy.range_margin"),
        ({"tracing": {"protocol": "smoke"}}, "tracing.protocol"),
        ({"drift": {"window_rows": "x"}}, "drift.window_rows"),
        ({"colour": 1}, "unknown key"),
        ({"primary": {"path": "nope.onnx"}}, "primary.path: file .* does not exist"),
        ({"primary": {"path": "a.onnx", "callable": "m:f"}}, "exactly one of"),
    ],
)
def test_errors_name_the_key(tmp_path, changes, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, **changes))


def test_not_yaml(tmp_path) -> None:
    (tmp_path / "c.yaml").write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "c.yaml")
