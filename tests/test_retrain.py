"""Retraining: the retrain: section, running the user's script, the time-ordered holdout, and the
example's loop end to end (log the shift with outcomes, retrain, replay)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import onnx
import pandas as pd
import pytest
import yaml

from guarded_serving.cli import main
from guarded_serving.config import load_config
from guarded_serving.errors import ConfigError, RetrainError
from guarded_serving.retrain import (
    RetrainSpec,
    run,
    split_holdout,
)

from ._data import EXAMPLE, serve
from ._logged import log_traffic
from .server import write_config

RETRAIN_SCRIPT = EXAMPLE / "retrain.py"


def _plan(tmp_path: Path, command: str | list[str], **keys: object):  # noqa: ANN202
    spec = RetrainSpec.from_dict({"command": command, **keys}, base=tmp_path)
    return spec.plan(
        run_dir=spec.new_run_dir(),
        config=tmp_path / "serving.yaml",
        profile=tmp_path / "profile.json",
        target="price",
        task="regression",
    )


def test_spec_fills_placeholders_and_environment(tmp_path: Path) -> None:
    plan = _plan(
        tmp_path,
        ["{python}", "train.py", "--data={export}", "{candidate}", "{target}"],
        candidate="model-{task}.onnx",
        env={"EPOCHS": 3},
    )
    assert plan.argv[0] == sys.executable
    assert plan.argv[2] == f"--data={plan.run_dir / 'export.parquet'}"
    assert plan.candidate == plan.run_dir / "model-regression.onnx"
    assert plan.argv[3:] == (str(plan.candidate), "price")
    assert plan.run_dir.parent == tmp_path / "retrain"
    assert plan.cwd == tmp_path
    assert plan.env["EPOCHS"] == "3"
    assert plan.env["GUARDED_SERVING_EXPORT"] == str(plan.export)
    assert plan.env["GUARDED_SERVING_CANDIDATE"] == str(plan.candidate)
    assert plan.env["GUARDED_SERVING_PROFILE"] == str(tmp_path / "profile.json")


def test_spec_names_every_bad_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        RetrainSpec.from_dict(
            {
                "command": "train {data}",
                "holdout": 1.5,
                "timeout_seconds": 0,
                "candidate": "../out.onnx",
                "colour": "red",
            },
            base=tmp_path,
        )
    msg = e.value.message
    for key in (
        "unknown placeholder(s) ['data']",
        "holdout",
        "timeout_seconds",
        "candidate:",
        "colour",
    ):
        assert key in msg
    with pytest.raises(ConfigError, match="command: must be"):
        RetrainSpec.from_dict({"command": {"run": "x"}}, base=tmp_path)
    with pytest.raises(ConfigError, match="command: is empty"):
        RetrainSpec.from_dict({"command": "  "}, base=tmp_path)


def test_run_collects_the_candidate_and_reports_failures(tmp_path: Path) -> None:
    write = "import os, pathlib; pathlib.Path(os.environ['GUARDED_SERVING_CANDIDATE']).write_text('m'); print('ok')"
    done = run(_plan(tmp_path, [sys.executable, "-c", write]))
    assert done.candidate.read_text() == "m"
    assert done.log.read_text().strip() == "ok"

    fail = "import sys; print('bad data in row 7'); sys.exit(3)"
    with pytest.raises(RetrainError, match=r"status 3[\s\S]*bad data in row 7"):
        run(_plan(tmp_path, [sys.executable, "-c", fail]))
    with pytest.raises(RetrainError, match="wrote no candidate"):
        run(_plan(tmp_path, [sys.executable, "-c", "pass"]))
    with pytest.raises(RetrainError, match="longer than 0.5 s"):
        run(
            _plan(
                tmp_path, [sys.executable, "-c", "import time; time.sleep(30)"], timeout_seconds=0.5
            )
        )
    with pytest.raises(RetrainError, match="cannot run"):
        run(_plan(tmp_path, "no-such-trainer-binary"))


def test_holdout_is_the_newest_rows_with_outcomes() -> None:
    rows = pd.DataFrame(
        {"ts": [5.0, 1.0, 4.0, 2.0, 3.0, 6.0], "price": [5.0, 1.0, None, 2.0, 3.0, 6.0]}
    )
    train, hold = split_holdout(rows, "price", 0.4)
    assert sorted(hold["ts"]) == [5.0, 6.0]
    assert sorted(train["ts"]) == [1.0, 2.0, 3.0, 4.0], "rows without outcomes stay in the export"
    train, hold = split_holdout(rows, "price", 0.0)
    assert len(train) == 6 and hold.empty


def test_config_with_and_without_a_retrain_section(tmp_path: Path) -> None:
    plain = write_config(tmp_path, retrain=None)
    assert load_config(plain).retrain is None
    assert main(["retrain", str(plain)]) == 2, "no retrain: section and no --command"
    (tmp_path / "r").mkdir()
    cfg = write_config(tmp_path / "r", retrain={"command": "{python} train.py", "workdir": "runs"})
    config = load_config(cfg)
    spec = config.retrain
    assert config.name == "diamonds-price"
    assert spec is not None and spec.workdir == (tmp_path / "r" / "runs").resolve()
    raw = yaml.safe_load(cfg.read_text())
    raw["retrain"]["holdout"] = "most"
    cfg.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="holdout"):
        load_config(cfg)


@pytest.mark.e2e
def test_the_example_retrained_on_the_shift_replays_better(tmp_path: Path, capsys) -> None:
    """Log the example's shift with outcomes; retrain with the example's script on the older rows;
    the candidate replays better than the primary and the guarded service on the newer ones."""
    command = f"{{python}} {RETRAIN_SCRIPT} --export {{export}} --out {{candidate}}"
    cfg = write_config(tmp_path, retrain={"command": command, "holdout": 0.2})
    shifted = serve().iloc[:3000]  # half in-range stones, half over a carat
    log_traffic(cfg, shifted.iloc[:2400])
    boundary = time.time()
    log_traffic(cfg, shifted.iloc[2400:])

    assert main(["retrain", str(cfg), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    candidate = Path(out["candidate_path"])
    version = {p.key: p.value for p in onnx.load(str(candidate)).metadata_props}["version"]
    assert version.startswith("retrained-")
    export = pd.read_parquet(Path(out["run_dir"]) / "export.parquet")
    assert len(export) == 2400, "the newest 20% of the rows with outcomes are held out"

    r = out["replay"]
    assert r["n"] == 600
    assert r["verdict"] == "better"
    assert r["comparisons"]["primary"]["verdict"] == "better"
    on_shift = r["by_route"]["fallback"]  # the stones the guard took away from the primary
    assert on_shift["n"] > 200
    assert on_shift["comparisons"]["primary"]["verdict"] == "better"
    assert on_shift["comparisons"]["guarded"]["verdict"] == "better"

    # The same rows through `replay`: the same figures.
    since = pd.Timestamp(boundary, unit="s", tz="UTC").isoformat()
    assert (
        main(["replay", str(cfg), "--candidate", str(candidate), "--since", since, "--json"]) == 0
    )
    assert json.loads(capsys.readouterr().out) == r
