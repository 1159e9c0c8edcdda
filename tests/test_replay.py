"""Replay: metrics beside the live models, paired bootstrap intervals, the verdict rule, and the
`replay` command's numbers against a direct computation from the export."""

from __future__ import annotations

import json
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest

from guarded_serving.adapters import load_model
from guarded_serving.cli import main
from guarded_serving.config import load_config
from guarded_serving.errors import GuardedServingError
from guarded_serving.performance import live_performance
from guarded_serving.profile import Profile
from guarded_serving.replay import Verdict, _bootstrap_sums, parse_margin, replay
from guarded_serving.scoring import score
from guarded_serving.store.sql import Store

from ._data import EXAMPLE, TARGET, serve
from ._logged import log_traffic
from .server import write_config


def _regression_rows(n: int = 400, seed: int = 1) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.normal(1000.0, 300.0, n)
    route = np.where(rng.random(n) < 0.6, "primary", "fallback")
    primary = y + rng.normal(0, 40, n)
    primary[route == "fallback"] += 300.0  # the primary is bad where the guard took rows away
    fallback = y + rng.normal(0, 80, n)
    rows = pd.DataFrame(
        {
            "price": y,
            "route": route,
            "primary_prediction": primary,
            "fallback_prediction": fallback,
            "prediction": np.where(route == "primary", primary, fallback),
        }
    )
    return rows, y + rng.normal(0, 30, n)


def test_point_metrics_are_scoring_on_the_rows_each_model_predicted() -> None:
    rows, cand = _regression_rows()
    rows.loc[rows.index[:25], "primary_prediction"] = np.nan  # the primary did not run there
    rows.loc[rows.index[-5:], "price"] = np.nan  # no outcome yet: left out
    r = replay(rows, cand, "regression", target="price", n_boot=200)
    have = rows["price"].notna().to_numpy()
    y = rows["price"].to_numpy()
    assert r.n == int(have.sum())
    primary_ok = have & rows["primary_prediction"].notna().to_numpy()
    assert r.scopes["all"].metrics["primary"] == score(
        "regression", y[primary_ok], rows["primary_prediction"][primary_ok]
    )
    assert r.scopes["all"].metrics["candidate"] == score("regression", y[have], cand[have])
    fb = have & (rows["route"] == "fallback").to_numpy()
    assert r.scopes["fallback"].metrics["guarded"] == score(
        "regression", y[fb], rows["prediction"][fb]
    )
    assert r.scopes["all"].comparisons["primary"].n == int(primary_ok.sum())


def test_intervals_are_a_paired_bootstrap_over_rows() -> None:
    """The vectorized bootstrap equals resampling row indices one resample at a time."""
    rows, cand = _regression_rows(n=150)
    n_boot, seed = 300, 5
    r = replay(rows, cand, "regression", target="price", n_boot=n_boot, seed=seed)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(rows), size=(n_boot, len(rows)))  # the draws of the "all" scope
    y = rows["price"].to_numpy()
    served = rows["prediction"].to_numpy()
    cand_mae = np.array([np.mean(np.abs(cand[i] - y[i])) for i in idx])
    gain = np.array(
        [np.mean(np.abs(served[i] - y[i])) - np.mean(np.abs(cand[i] - y[i])) for i in idx]
    )
    assert r.scopes["all"].intervals["candidate"]["mae"] == pytest.approx(
        tuple(np.quantile(cand_mae, [0.025, 0.975]))
    )
    assert r.scopes["all"].comparisons["guarded"].intervals["mae"] == pytest.approx(
        tuple(np.quantile(gain, [0.025, 0.975]))
    )
    again = replay(rows, cand, "regression", target="price", n_boot=n_boot, seed=seed)
    assert again.to_dict() == r.to_dict()


def test_bootstrap_sums_in_chunks_equal_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    stats = np.random.default_rng(0).random((50, 3))
    whole = _bootstrap_sums(stats, 40, np.random.default_rng(1))
    monkeypatch.setattr("guarded_serving.replay._CELLS_PER_CHUNK", 50 * 7)
    chunked = _bootstrap_sums(stats, 40, np.random.default_rng(1))
    assert chunked.shape == (40, 3)
    assert np.allclose(chunked, whole)


def test_verdict_rule_and_margin() -> None:
    rows, _ = _regression_rows(n=500)
    y = rows["price"].to_numpy()
    served = rows["prediction"].to_numpy()
    better = replay(rows, y + 1.0, "regression", target="price")
    assert better.verdict == Verdict.BETTER
    worse = replay(rows, y + 2000.0, "regression", target="price")
    assert worse.verdict == Verdict.WORSE
    same = replay(rows, served, "regression", target="price")
    assert same.verdict == Verdict.INCONCLUSIVE
    assert same.scopes["all"].comparisons["guarded"].intervals["mae"] == (0.0, 0.0)
    # Slightly worse: worse with no margin, inconclusive once the margin covers the difference.
    slightly = served + np.sign(served - y) * 5.0
    assert replay(rows, slightly, "regression", target="price").verdict == Verdict.WORSE
    tolerant = replay(rows, slightly, "regression", target="price", margin=10)
    assert tolerant.verdict == Verdict.INCONCLUSIVE
    guarded_mae = tolerant.scopes["all"].metrics["guarded"]["mae"]
    relative = replay(rows, slightly, "regression", target="price", margin="50%")
    assert relative.scopes["all"].comparisons["guarded"].margin == pytest.approx(0.5 * guarded_mae)
    assert relative.verdict == Verdict.INCONCLUSIVE


def test_classification_accuracy_and_f1_match_scoring() -> None:
    rng = np.random.default_rng(3)
    n = 300
    y = rng.choice(["good", "ideal", "premium"], n)
    live = np.where(rng.random(n) < 0.7, y, "good")
    cand = np.where(rng.random(n) < 0.9, y, "premium")
    rows = pd.DataFrame(
        {
            "cut": y,
            "route": "primary",
            "prediction": live,
            "primary_prediction": live,
            "fallback_prediction": np.where(rng.random(n) < 0.5, y, "ideal"),
        }
    )
    r = replay(rows, cand, "classification", target="cut", n_boot=200)
    assert r.metric == "accuracy"
    assert r.scopes["all"].metrics["candidate"] == score("classification", y, cand)
    lo, hi = r.scopes["all"].intervals["candidate"]["f1"]
    assert lo <= score("classification", y, cand)["f1"] <= hi
    assert r.verdict == Verdict.BETTER
    assert set(r.to_dict()["candidate"]) == {"n", "accuracy", "f1"}


def test_bad_input_is_a_clear_error() -> None:
    rows, cand = _regression_rows(n=20)
    with pytest.raises(GuardedServingError, match="candidate prediction"):
        replay(rows, cand[:5], "regression", target="price")
    with pytest.raises(GuardedServingError, match="no 'outcome' column"):
        replay(rows, cand, "regression")
    with pytest.raises(GuardedServingError, match="margin"):
        parse_margin("-1")
    with pytest.raises(GuardedServingError, match="margin"):
        parse_margin("lots")


def test_no_rows_gives_an_inconclusive_replay() -> None:
    rows, cand = _regression_rows(n=10)
    out = replay(rows.iloc[:0], cand[:0], "regression", target="price", n_boot=10).to_dict()
    assert out["n"] == 0 and out["verdict"] == "inconclusive"
    json.dumps(out, allow_nan=False)


# -- the command, on traffic logged by an in-process runtime ---------------------------------------


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config whose store holds 600 served rows of the example's shift (small and large stones)
    with their outcomes."""
    directory = tmp_path_factory.mktemp("replay")
    cfg = write_config(directory)
    log_traffic(cfg, serve().iloc[:600])
    return cfg


def test_replay_matches_a_direct_computation_from_the_export(
    logged: Path, tmp_path: Path, capsys
) -> None:
    export = tmp_path / "export.parquet"
    assert main(["export", str(logged), "--out", str(export), "--with-outcomes-only"]) == 0
    capsys.readouterr()
    candidate = EXAMPLE / "fallback.onnx"  # any other model will do: here the fallback itself
    # The fallback alone is worse than the guarded service: the command says so in its status.
    assert main(["replay", str(logged), "--candidate", str(candidate), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == "worse"

    rows = pd.read_parquet(export)
    profile = Profile.load(EXAMPLE / "profile.json")
    cand = load_model(candidate, task="regression").predict(rows[profile.feature_names]).labels
    y = rows[TARGET].to_numpy()
    assert out["n"] == len(rows) == 600
    assert out["candidate"] == score("regression", y, cand)
    for role, col in {
        "primary": "primary_prediction",
        "fallback": "fallback_prediction",
        "guarded": "prediction",
    }.items():
        have = rows[col].notna().to_numpy()
        assert out[role] == score("regression", y[have], rows[col].to_numpy()[have])
        for route in ("primary", "fallback"):
            sel = have & (rows["route"] == route).to_numpy()
            assert out["by_route"][route][role] == score(
                "regression", y[sel], rows[col].to_numpy()[sel]
            )
    # The live models' figures are /performance's, under its metric names.
    config = load_config(logged)
    perf = live_performance(Store(config.store.url).outcome_rows(), "regression")
    for role in ("primary", "fallback", "guarded"):
        assert out[role] == pytest.approx(perf["overall"][role])
        assert out["by_route"]["fallback"][role] == pytest.approx(
            {k: v for k, v in perf["by_route"]["fallback"][role].items()}
        )
    # The candidate is the fallback: no difference, so no verdict either way.
    assert out["candidate"] == out["fallback"]
    assert out["comparisons"]["fallback"]["intervals"]["mae"] == [0.0, 0.0]
    assert out["comparisons"]["guarded"]["verdict"] == out["verdict"]
    lo, hi = out["intervals"]["candidate"]["mae"]
    assert lo < out["candidate"]["mae"] < hi


def test_replay_exits_non_zero_when_the_candidate_is_worse(
    logged: Path, tmp_path: Path, capsys
) -> None:
    from sklearn.dummy import DummyRegressor

    rows = serve().iloc[:50]
    path = tmp_path / "mean.joblib"
    joblib.dump(DummyRegressor().fit(rows[["carat"]], rows[TARGET]), path)
    args = ["replay", str(logged), "--candidate", str(path)]
    assert main(args) == 2, "a pickle needs --trusted"
    assert "trusted" in capsys.readouterr().err
    assert main([*args, "--trusted"]) == 1
    text = capsys.readouterr().out
    assert "verdict: worse" in text and "rows the service routed to the fallback" in text
    assert main([*args, "--trusted", "--margin", "1000000"]) == 0, (
        "within a huge margin it is not worse"
    )
    assert main(["replay", str(logged), "--candidate", "no_such_module:predict"]) == 2
    assert main(["replay", str(logged), "--candidate", str(path), "--margin", "x"]) == 2


def test_replay_since_selects_newer_rows(logged: Path, capsys) -> None:
    assert (
        main(
            [
                "replay",
                str(logged),
                "--candidate",
                str(EXAMPLE / "primary.onnx"),
                "--json",
                "--since",
                "2100-01-01T00:00Z",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 0 and out["verdict"] == "inconclusive"


def test_profile_names_the_candidates_features(logged: Path, tmp_path: Path, capsys) -> None:
    from sklearn.linear_model import LinearRegression

    from guarded_serving.profile import build_profile

    from ._data import train

    data = train()[["carat", TARGET]]
    build_profile(data, TARGET, task="regression").save(tmp_path / "carat.json")
    path = tmp_path / "carat.joblib"
    joblib.dump(LinearRegression().fit(data[["carat"]], data[TARGET]), path)
    args = ["replay", str(logged), "--candidate", str(path), "--trusted", "--json"]
    assert main(args) == 2, "given every logged feature, the carat-only model fails"
    assert "the candidate failed on the logged rows" in capsys.readouterr().err
    assert main([*args, "--profile", str(tmp_path / "carat.json")]) in (0, 1)
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 600 and out["candidate"]["n"] == 600
