import json

import pandas as pd

from guarded_serving.cli import main
from guarded_serving.profile import Profile

from ._data import CONFIG, EXAMPLE

DATA = EXAMPLE / "data"


def test_profile_fallback_check_predict(tmp_path, capsys) -> None:
    assert main(["profile", str(DATA / "train.parquet"), "--target", "price",
                 "--out", str(tmp_path / "p.json")]) == 0
    assert Profile.load(tmp_path / "p.json").n_rows > 10_000
    assert main(["fallback", str(DATA / "train.parquet"), "--target", "price",
                 "--task", "regression", "--out", str(tmp_path / "fb.onnx")]) == 0
    capsys.readouterr()
    assert main(["check", str(DATA / "serve.parquet"), "--profile", str(tmp_path / "p.json"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 10_000 and report["fallback"] > 4000
    assert report["reasons"]["out_of_range:carat"] == 5000
    assert main(["check", str(DATA / "serve.parquet"), "--profile", str(tmp_path / "p.json")]) == 0
    assert "to fallback" in capsys.readouterr().out
    out = tmp_path / "pred.parquet"
    assert main(["predict", str(CONFIG), str(DATA / "serve.parquet"), "--out", str(out)]) == 0
    pred = pd.read_parquet(out)
    assert set(pred.route) == {"primary", "fallback"} and len(pred) == 10_000


def test_errors_are_one_line_and_exit_2(tmp_path, capsys) -> None:
    (tmp_path / "c.yaml").write_text("name: x\n")
    assert main(["predict", str(tmp_path / "c.yaml"), str(DATA / "serve.parquet")]) == 2
    assert "missing required key" in capsys.readouterr().err
