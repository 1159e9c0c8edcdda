"""The ``guarded-serving`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from .errors import GuardedServingError, Problem

log = logging.getLogger(__name__)
CHUNK_ROWS = 10_000


def read_table(path: str | Path) -> pd.DataFrame:
    """A CSV or Parquet file as a DataFrame."""
    p = Path(path)
    if not p.exists():
        raise GuardedServingError(f"no such file: {p}")
    if p.suffix in (".parquet", ".pq"):
        return pd.read_parquet(p)
    if p.suffix in (".csv", ".txt") or p.suffix.endswith(".gz"):
        return pd.read_csv(p)
    raise GuardedServingError(f"cannot read {p}: expected a .csv or .parquet file")


#: Output formats by file suffix.
WRITERS = {".csv": "CSV", ".parquet": "Parquet", ".pq": "Parquet", ".json": "JSON (an array of records)",
           ".jsonl": "JSON lines"}


def output_suffix(path: str | Path) -> str:
    """The suffix of an output file if this CLI can write it (``WRITERS``); else an error, before
    any work is done."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in WRITERS:
        known = ", ".join(WRITERS)
        raise GuardedServingError(f"cannot write {p}: unknown file type {p.suffix or '(none)'!r}; use one of {known}")
    return suffix


def write_table(df: pd.DataFrame, path: str | Path) -> None:
    """Write ``df`` in the format its suffix names (``WRITERS``)."""
    p = Path(path)
    suffix = output_suffix(p)
    if suffix == ".csv":
        df.to_csv(p, index=False)
    elif suffix in (".json", ".jsonl"):
        df.to_json(p, orient="records", lines=suffix == ".jsonl", date_format="iso", double_precision=15)
    else:
        df.to_parquet(p, index=False)


def _chunks(df: pd.DataFrame, desc: str) -> Any:
    starts = range(0, max(len(df), 1), CHUNK_ROWS)
    bar = tqdm(starts, desc=desc, unit="chunk", disable=len(starts) < 3, file=sys.stderr)
    for s in bar:
        yield df.iloc[s : s + CHUNK_ROWS]


# -- commands ----------------------------------------------------------------------------------


def cmd_profile(args: argparse.Namespace) -> int:
    from .adapters import load_model
    from .profile import DEFAULT_MAX_CATEGORIES, build_profile

    data = read_table(args.data)
    if args.target in data.columns and data[args.target].isna().any():
        # Production exports carry rows without outcomes: a profile needs the target.
        n = int(data[args.target].isna().sum())
        print(f"dropping {n} row(s) without a {args.target!r} value", file=sys.stderr)
        data = data[data[args.target].notna()]
    exclude = list(args.exclude or [])
    if args.from_export:
        exclude += [c for c in EXPORT_META_COLUMNS if c in data.columns and c != args.target]
    primary = load_model(args.primary, trusted=args.trusted) if args.primary else None
    fallback = load_model(args.fallback, trusted=args.trusted) if args.fallback else None
    holdout = read_table(args.holdout) if args.holdout else None
    with tqdm(total=1, desc="profiling", file=sys.stderr, disable=len(data) < 50_000) as bar:
        profile = build_profile(data, args.target, exclude=exclude, task=args.task,
                                n_bins=args.bins, primary=primary, fallback=fallback,
                                holdout=holdout, source=str(args.data),
                                time_index=args.time_index or (),
                                categorical=args.categorical or (),
                                no_outlier=args.no_outlier or (),
                                max_categories=args.max_categories or DEFAULT_MAX_CATEGORIES)
        bar.update()
    profile.save(args.out)
    if holdout is not None and primary is not None:
        _fit_estimation(profile, holdout, primary, fallback, args.out)
    kinds = Counter(f.kind for f in profile.features)
    print(f"profiled {profile.n_rows} rows, {len(profile.features)} features "
          f"({', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))}); task {profile.task}; "
          f"wrote {args.out} ({profile.content_hash[:19]}...)")
    if profile.time_index:
        print(f"time index: {', '.join(profile.time_index)} (no range check, not in the outlier score, "
              "no drift test)")
    for f in profile.features:
        if f.invalid_count:
            shown = ", ".join(f"{v!r} ({c})" for v, c in f.invalid_values.items())
            print(f"column {f.name!r} is {f.kind}: {f.invalid_count} value(s) that are not numbers were "
                  f"left out of its profile ({shown}); serving rejects such values. Pass "
                  f"--categorical {f.name} to treat it as categorical", file=sys.stderr)
        if f.categories_truncated:
            print(f"column {f.name!r} has more than {len(f.categories)} distinct values: the profile keeps "
                  f"the {len(f.categories)} most frequent and counts {f.other_count} row(s) as other; "
                  "its values are not checked against training's", file=sys.stderr)
    for role, metrics in profile.baseline.items():
        print(f"baseline {role}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return 0


def _fit_estimation(profile: Any, holdout: pd.DataFrame, primary: Any, fallback: Any, out: str) -> None:
    """Fit what estimating performance without labels needs, on the holdout, beside the profile."""
    import importlib.util

    from .estimation import estimation_dir, fit_estimation

    if profile.task == "regression" and importlib.util.find_spec("skl2onnx") is None:
        print("no performance estimation fitted: its error models need skl2onnx "
              "(pip install 'guarded-serving[estimation]')", file=sys.stderr)
        return
    with tqdm(total=1, desc="fitting estimation", file=sys.stderr, disable=len(holdout) < 20_000) as bar:
        est = fit_estimation(profile, holdout, {"primary": primary, "fallback": fallback}, estimation_dir(out))
        bar.update()
    for role, art in est.roles.items():
        if art.calibration is not None:
            c = art.calibration
            print(f"estimation {role}: calibration {'applied' if c.applied else 'not applied'} "
                  f"(cross-fitted on the holdout: ECE {c.ece_raw:.4f} raw, {c.ece_calibrated:.4f} "
                  f"calibrated; Brier {c.brier_raw:.4f} raw, {c.brier_calibrated:.4f} calibrated)")
        else:
            print(f"estimation {role}: error models {', '.join(art.error_models.values())}")
    print(f"wrote {est.directory}")


#: The prediction-log columns ``guarded-serving export`` writes beside the features, in order.
EXPORT_COLUMNS = (
    "request_id", "row", "ts", "model", "primary_model", "primary_version", "fallback_model",
    "fallback_version", "route", "reasons", "prediction", "primary_prediction", "fallback_prediction",
    "latency_ms", "outcome_ts",
)
#: Columns of an export (or of similar files) that are not features: skipped by --from-export.
EXPORT_META_COLUMNS = (*EXPORT_COLUMNS, "served_prediction", "probabilities")


def cmd_fallback(args: argparse.Namespace) -> int:
    from .fallback import FallbackTrainer

    data = read_table(args.data)
    exclude = list(args.exclude or [])
    if args.from_export:
        exclude += [c for c in EXPORT_META_COLUMNS if c in data.columns and c != args.target]
        data = data[data[args.target].notna()] if args.target in data.columns else data
    trainer = FallbackTrainer(task=args.task, alpha=args.alpha, C=args.C,
                              clip_margin=args.clip_margin, name=args.name)
    trainer.fit(data, args.target, exclude=exclude)
    trainer.save_onnx(args.out)
    coefs = sorted(trainer.coefficients().items(), key=lambda kv: -abs(kv[1]))[:8]
    print(f"trained {args.task} fallback on {len(data)} rows, "
          f"{len(trainer.numeric_)} numeric and {len(trainer.categorical_)} categorical features; wrote {args.out}")
    print("largest coefficients: " + ", ".join(f"{k}={v:+.4g}" for k, v in coefs))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .checks import FALLBACK, OK, REJECT, check_batch
    from .config import load_config
    from .errors import ConfigError
    from .policy import Policy
    from .profile import Profile

    if not (args.config or args.profile):
        raise ConfigError("check: give --config CONFIG (its profile and policy) or --profile PROFILE")
    config = load_config(args.config) if args.config else None
    profile = Profile.load(args.profile or config.profile)  # type: ignore[union-attr]
    policy = config.policy if config else Policy()
    if args.policy:
        try:
            overrides = json.loads(args.policy)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--policy is not valid JSON: {e}") from e
        if not isinstance(overrides, dict):
            raise ConfigError("--policy must be a JSON object of policy keys")
        policy = Policy.from_dict({**_policy_keys(policy), **overrides}, time_index=policy.time_index)
    policy = policy.with_time_index(args.time_index or ())
    periods = _period_states(profile, policy, args.drift_by) if args.drift_by else None
    data = read_table(args.data)
    totals = Counter[str]()
    reasons = Counter[str]()
    problems = Counter[str]()
    extra: set[str] = set()
    for chunk in _chunks(data, "checking"):
        v = check_batch(chunk, profile, policy)
        totals["pass"] += int((v.status == OK).sum())
        totals["fallback"] += int((v.status == FALLBACK).sum())
        totals["rejected"] += int((v.status == REJECT).sum())
        reasons.update(v.reason_counts())
        problems.update(f"{p.problem}:{p.column}" for p in v.problems)
        extra.update(v.extra_columns)
        if periods is not None:
            kept = ~v.rejected
            periods.update({k: c[kept] for k, c in v.columns.items()})
    n = len(data)
    report: dict[str, Any] = {
        "rows": n,
        "pass": totals["pass"],
        "fallback": totals["fallback"],
        "rejected": totals["rejected"],
        "reasons": dict(reasons.most_common()),
        "schema_problems": dict(problems.most_common()),
        "extra_columns": sorted(extra),
    }
    if periods is not None:
        from .drift.stats import DriftThresholds

        min_rows = config.drift.min_rows if config else DriftThresholds().min_rows
        report["drift_by_period"] = [
            {"period": d["period"], "rows": d["rows"], "status": d["status"],
             "drifting": [f["name"] for f in d["features"] if f["status"] == "drift"]}
            for d in periods.evaluate(DriftThresholds(min_rows=min_rows, policy=policy))
        ]
    if args.json:
        print(json.dumps(report, indent=2))
        return 0

    def pct(key: str) -> float:
        return 100.0 * totals[key] / n if n else 0.0

    print(f"{n} rows: {report['pass']} pass ({pct('pass'):.2f}%), {report['fallback']} to fallback "
          f"({pct('fallback'):.2f}%), {report['rejected']} rejected ({pct('rejected'):.2f}%)")
    if reasons:
        print("\nreasons (rows)\n" + "\n".join(f"  {r:<40} {c}" for r, c in reasons.most_common()))
    if problems:
        print("\nschema problems (rows)\n" + "\n".join(f"  {r:<40} {c}" for r, c in problems.most_common()))
    if extra:
        print(f"\ncolumns not in the profile (ignored): {', '.join(sorted(extra))}")
    if periods is not None:
        print(f"\ndrift by {periods.period} of {periods.column} (period, rows, status, drifting features)")
        for d in report["drift_by_period"]:
            print(f"  {d['period']!s:<12} {d['rows']:>8}  {d['status']:<17} {', '.join(d['drifting'])}")
    return 0


def _period_states(profile: Any, policy: Any, period: str) -> Any:
    """Drift states by calendar ``period`` of the (first) datetime time index."""
    from .drift.periods import PeriodStates

    index = [*profile.time_index, *policy.time_index]
    column = next((c for c in index if profile.feature(c).is_datetime), None)
    if column is None:
        raise GuardedServingError(f"--drift-by needs a datetime time index (--time-index or the config's "
                                  f"time_index); the time index is {index or 'empty'}")
    return PeriodStates.empty(profile, column, period)


def _policy_keys(policy: Any) -> dict[str, Any]:
    """A policy as the keys of a ``policy:`` block (without its time index)."""
    keys = policy.to_dict()
    keys.pop("time_index")
    return keys


def cmd_predict(args: argparse.Namespace) -> int:
    from .config import load_config
    from .guard import GuardedModel

    if args.out:
        output_suffix(args.out)
    config = load_config(args.config)
    gm = GuardedModel.from_config(config)
    data = read_table(args.data)
    missing = [f.name for f in gm.profile.features if f.name not in data.columns]
    if missing:
        raise GuardedServingError(
            f"{args.data} lacks {len(missing)} feature column(s) of the profile: {', '.join(missing)}",
            [Problem(problem="missing column", column=c, expected="a column of the profile") for c in missing])
    parts = []
    for chunk in _chunks(data, "predicting"):
        r = gm.predict(chunk, on_reject="mark")
        part = pd.DataFrame({
            "prediction": r.predictions,
            "route": r.routes,
            "reasons": [";".join(x) for x in r.reasons],
        }, index=chunk.index)
        if r.probabilities is not None:
            for j, c in enumerate(r.classes or []):
                part[f"proba_{c}"] = r.probabilities[:, j]
        parts.append(part)
    out = pd.concat(parts) if parts else pd.DataFrame(columns=["prediction", "route", "reasons"])
    counts = out["route"].value_counts().to_dict()
    summary = ", ".join(f"{counts.get(k, 0)} {k}" for k in ("primary", "fallback", "rejected"))
    if args.out:
        write_table(pd.concat([data, out], axis=1), args.out)
        print(f"{len(out)} rows: {summary}; wrote {args.out}")
    else:
        print(out.to_csv(index=False), end="")
        print(f"{len(out)} rows: {summary}", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .service import serve

    print(f"serving {args.config or 'the example'} on http://{args.host}:{args.port} "
          f"with {args.workers} worker(s); Ctrl-C stops it", file=sys.stderr)
    return serve(args.config, host=args.host, port=args.port, workers=args.workers)


def cmd_build(args: argparse.Namespace) -> int:
    from .bento import BuildOptions, build_bento

    options = BuildOptions(name=args.name, version=args.version, base_image=args.base_image)
    with tqdm(total=1, desc="bentoml build", file=sys.stderr) as bar:
        tag = build_bento(args.config, options)
        bar.update()
    print(f"serve it with `bentoml serve {tag}`; build its image with "
          f"`bentoml containerize {tag}` (or deploy/container/build-image.sh {tag} IMAGE)", file=sys.stderr)
    print(tag)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .config import load_config

    output_suffix(args.out)
    config = load_config(args.config)
    since = _parse_time(args.since) if args.since else None
    out, target, where = read_export(config, since=since, with_outcomes_only=args.with_outcomes_only)
    write_table(out, args.out)
    with_outcome = int(out[target].notna().sum()) if target in out else 0
    print(f"exported {len(out)} logged rows ({with_outcome} with outcomes) from {where} "
          f"to {args.out}; train the next model with --target {target}")
    return 0


def read_export(config: Any, since: float | None = None,
                with_outcomes_only: bool = False) -> tuple[pd.DataFrame, str, str]:
    """(the prediction log as ``export`` writes it, the target column, the store as shown)."""
    from .profile import Profile
    from .store.sql import Store

    profile = Profile.load(config.profile)
    target = profile.target
    store = Store(config.store.url, prefix=config.store.table_prefix)
    try:
        with tqdm(total=1, desc="reading the prediction log", file=sys.stderr) as bar:
            df = store.joined(since=since, with_outcomes_only=with_outcomes_only)
            bar.update()
    finally:
        store.close()
    return export_frame(df, target, profile), target, store.url_display


def export_frame(df: pd.DataFrame, target: str, profile: Any = None) -> pd.DataFrame:
    """Flatten the prediction log for retraining: one column per feature, the outcome under the
    profile's target name, and the serving metadata (EXPORT_COLUMNS) beside them. Datetime
    features (logged as epoch seconds) come back as datetimes in their training time zone."""
    feats = pd.DataFrame([f if isinstance(f, dict) else {} for f in df.get("features", [])], index=df.index)
    meta = [c for c in EXPORT_COLUMNS if c in df.columns]
    out = pd.concat([feats, df[meta]], axis=1)
    out[target] = df["outcome"] if "outcome" in df.columns else None
    if "ts" in out:
        out["ts"] = pd.to_datetime(out["ts"], unit="s", utc=True)
    if "outcome_ts" in out:
        out["outcome_ts"] = pd.to_datetime(out["outcome_ts"], unit="s", utc=True)
    for f in profile.features if profile is not None else ():
        if f.is_datetime and f.name in out and pd.api.types.is_numeric_dtype(out[f.name]):
            ts = pd.to_datetime(out[f.name], unit="s", utc=True)
            out[f.name] = ts.dt.tz_convert(f.timezone) if f.timezone else ts.dt.tz_localize(None)
    for c in ("prediction", "primary_prediction", "fallback_prediction", target):
        if c in out and out[c].map(lambda v: v is None or isinstance(v, (int, float))).all():
            out[c] = pd.to_numeric(out[c], errors="coerce")
    return out


def _parse_time(v: str) -> float:
    """Epoch seconds from an ISO-8601 time, or from a duration ago such as 24h, 7d, 30m."""
    import re
    import time

    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", v.strip())
    if m:
        return time.time() - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    try:
        ts = pd.Timestamp(v)
    except ValueError:
        raise GuardedServingError(f"--since: expected an ISO time (2026-11-01T00:00Z) or a duration (24h, 7d), got {v!r}") from None
    if ts.tzinfo is None:
        ts = ts.tz_localize("UTC")
    return float(ts.timestamp())


def cmd_replay(args: argparse.Namespace) -> int:
    from .config import load_config
    from .profile import Profile
    from .replay import parse_margin
    from .retrain import load_candidate

    parse_margin(args.margin)  # a bad margin fails before any work
    config = load_config(args.config)
    profile = Profile.load(args.profile or config.profile)
    candidate = load_candidate(args.candidate, task=config.task, trusted=args.trusted)
    since = _parse_time(args.since) if args.since else None
    rows, target, where = read_export(config, since=since, with_outcomes_only=True)
    result = _replay(candidate, rows, profile, target, config.task, args)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(f"replay of {args.candidate} on {result.n} logged row(s) with outcomes from {where}"
              + (f" since {args.since}" if args.since else ""))
        print(format_replay(result))
    return _replay_status(result)


def _replay(candidate: Any, rows: pd.DataFrame, profile: Any, target: str, task: str,
            args: argparse.Namespace) -> Any:
    """The candidate run on the logged feature columns of ``rows``, replayed beside the live models."""
    from .replay import replay

    missing = [f for f in profile.feature_names if f not in rows.columns]
    if missing and len(rows):
        raise GuardedServingError(
            f"the logged rows lack {len(missing)} feature column(s) the candidate needs: {', '.join(missing)} "
            "(is prediction_log.log_features off?)")
    parts = [np.empty(0)]
    for chunk in _chunks(rows[list(profile.feature_names)] if len(rows) else rows.iloc[0:0], "replaying"):
        if not len(chunk):
            continue
        try:
            parts.append(np.asarray(candidate.predict(chunk).labels).reshape(-1))
        except GuardedServingError:
            raise
        except Exception as e:
            raise GuardedServingError(f"the candidate failed on the logged rows: {type(e).__name__}: {e}") from e
    preds = np.concatenate(parts)
    return replay(rows, preds, task, target=target, margin=args.margin, n_boot=args.resamples, seed=args.seed)


def _replay_status(result: Any) -> int:
    """1 when the candidate is worse than the guarded service by more than the margin (a gate)."""
    from .replay import Verdict

    return 1 if result.verdict == Verdict.WORSE else 0


def format_replay(result: Any) -> str:
    """A replay as one table per set of rows: each model's metrics with their intervals, then the
    candidate's improvement over each live model and the verdict."""
    from .replay import ROLES

    lines = []
    names = [m for m in result.scopes["all"].metrics["candidate"] if m != "n"] or [result.metric]
    pct = round(result.confidence * 100)
    for scope_name, scope in result.scopes.items():
        title = "all rows" if scope_name == "all" else f"rows the service routed to the {scope_name}"
        lines.append(f"\n{title} ({scope.n})")
        lines.append(f"  {'model':<10} {'rows':>7}  " + "  ".join(f"{m + f' [{pct}% interval]':<34}" for m in names))
        for role in ROLES:
            m = scope.metrics[role]
            cells = [f"{_fmt(m.get(k))} [{_fmt(scope.intervals[role][k][0])}, {_fmt(scope.intervals[role][k][1])}]"
                     for k in names]
            lines.append(f"  {role:<10} {int(m.get('n', 0)):>7}  " + "  ".join(f"{c:<34}" for c in cells))
        for ref, c in scope.comparisons.items():
            lo, hi = c.intervals.get(c.metric, (float("nan"), float("nan")))
            lines.append(f"  candidate vs {ref:<9} {c.metric} improvement {_fmt(c.improvement.get(c.metric))} "
                         f"[{_fmt(lo)}, {_fmt(hi)}] on {c.n} rows, margin {_fmt(c.margin)}: {c.verdict}")
    lines.append(f"\nverdict: {result.verdict} (the candidate against the guarded service on all rows, "
                 f"{result.metric}, margin {result.margin}; improvement > 0 means the candidate is better)")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return f"{v:.4g}"


def cmd_retrain(args: argparse.Namespace) -> int:
    from .config import load_config
    from .errors import ConfigError
    from .profile import Profile
    from .retrain import RetrainSpec, load_candidate, run, split_holdout

    config = load_config(args.config)
    spec = config.retrain
    if args.command_line:
        spec = RetrainSpec.from_dict({"command": args.command_line}, base=Path(args.config).parent.resolve())
    if spec is None:
        raise ConfigError(f"{args.config} has no retrain: section with a command (or pass --command)")
    profile = Profile.load(config.profile)
    since_text = args.since or spec.since
    since = _parse_time(since_text) if since_text else None
    rows, target, where = read_export(config, since=since)
    holdout_fraction = spec.holdout if args.holdout is None else args.holdout
    train, holdout = split_holdout(rows, target, holdout_fraction)
    plan = spec.plan(run_dir=spec.new_run_dir(), config=Path(args.config).resolve(),
                     profile=Path(config.profile).resolve(), target=target, task=config.task)
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    write_table(train, plan.export)
    n_outcomes = int(train[target].notna().sum()) if target in train else 0
    print(f"exported {len(train)} logged rows ({n_outcomes} with outcomes) from {where} to {plan.export}; "
          f"{len(holdout)} newer row(s) with outcomes held out for the replay", file=sys.stderr)
    with tqdm(total=1, desc="retraining", file=sys.stderr) as bar:
        done = run(plan)
        bar.update()
    print(f"candidate {done.candidate} (retrained in {done.seconds:.1f} s; output in {done.log})",
          file=sys.stderr if args.json else sys.stdout)
    run_info = {"candidate_path": str(done.candidate), "run_dir": str(plan.run_dir), "log": str(done.log),
                "seconds": round(done.seconds, 3)}
    if not len(holdout):
        if args.json:
            print(json.dumps({**run_info, "replay": None}, indent=2))
        else:
            print("no held-out rows with outcomes to replay on; replay it later with "
                  f"guarded-serving replay {args.config} --candidate {done.candidate}")
        return 0
    candidate = load_candidate(done.candidate, task=config.task, trusted=spec.trusted)
    result = _replay(candidate, holdout, profile, target, config.task, args)
    if args.json:
        print(json.dumps({**run_info, "replay": result.to_dict()}, indent=2))
    else:
        print(f"replay on the {result.n} held-out row(s) with outcomes, newest first out of the export:")
        print(format_replay(result))
    return _replay_status(result)


def cmd_switch(args: argparse.Namespace) -> int:
    """promote / rollback: record the switch in the store; serving processes follow within seconds."""
    import getpass

    from .config import load_config
    from .promotion import Action, promote, rollback
    from .store.sql import Store

    config = load_config(args.config)
    store = Store(config.store.url, prefix=config.store.table_prefix, timeout_s=config.store.timeout_seconds)
    try:
        fn = promote if args.action == Action.PROMOTE else rollback
        ev = fn(store, config, actor=args.actor or f"cli:{getpass.getuser()}", reason=args.reason)
    finally:
        store.close()
    if args.json:
        print(json.dumps(ev.to_dict()))
    else:
        print(f"switch {ev.id}: {ev.action} from version {ev.from_version} to {ev.to_version} "
              f"({store.url_display}); serving processes follow within a few seconds")
    return 0


def cmd_migrate_store(args: argparse.Namespace) -> int:
    """Bring a store written by an older guarded-serving to the current layout (serving does the
    same when it opens one); --dry-run says what that would copy and leaves an older store as it is."""
    from .config import load_config
    from .store.migration import LegacyStoreError, legacy_name
    from .store.sql import Store

    config = load_config(args.config)
    url, prefix = config.store.url, config.store.table_prefix
    try:
        store = Store(url, prefix=prefix, timeout_s=config.store.timeout_seconds, migrate=not args.dry_run)
    except LegacyStoreError as e:
        print(f"{e.plan.describe()}\nrun without --dry-run to migrate them")
        return 0
    store.close()
    plan = store.migrated
    if plan is None:
        print(f"store {store.url_display} is in the current layout: nothing to migrate")
    else:
        kept = ", ".join(legacy_name(store, t) for t in plan.tables)
        print(f"{plan.describe()}\nmigrated {store.url_display} ({plan.copied} logged row(s) copied)"
              + (f"; the old tables are kept as {kept}: drop them once the log reads as expected"
                 if kept else ""))
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    from .config import load_config
    from .errors import ProfileError
    from .estimation import WindowEstimator, estimation_dir
    from .estimation.offline import estimate_rows
    from .guard import GuardedModel

    config = load_config(args.config)
    if not WindowEstimator.available(config.profile):
        raise ProfileError(f"no estimation artefacts beside {config.profile} (expected "
                           f"{estimation_dir(config.profile)}/); build the profile with --primary, "
                           "--fallback and --holdout")
    gm = GuardedModel.from_config(config)
    estimator = WindowEstimator.load(config.profile, gm.profile)
    models = {"primary": gm.primary, "fallback": gm.fallback}
    data = read_table(args.data)
    total = None
    for chunk in _chunks(data, "estimating"):
        estimated = estimate_rows(estimator, chunk, gm.profile, gm.policy, models)
        total = estimated if total is None else total.merge(estimated)
    assert total is not None
    report = {**total.tally.metrics(), "rejected": total.rejected, "baseline": gm.profile.baseline}
    if args.json:
        print(json.dumps(report, indent=2, allow_nan=False))
        return 0
    flagged = report["flagged"]
    print(f"{report['n']} rows estimated ({flagged['n']} flagged outside the training support, "
          f"{total.rejected} rejected); estimates without outcomes, 95% band in brackets")
    for scope, part in (("all rows", report), ("flagged rows", flagged)):
        if not part["n"]:
            continue
        print(f"\n{scope}")
        for role in ("guarded", "primary", "fallback"):
            metrics = {k: v for k, v in part.get(role, {}).items() if k != "n"}
            bands = part["bands"].get(role, {})
            shown = ", ".join(f"{k}={v:.4g} [{bands[k][0]:.4g}, {bands[k][1]:.4g}]" if k in bands else
                              f"{k}={v:.4g}" for k, v in metrics.items())
            print(f"  {role:<9} {shown}")
    for role, metrics in gm.profile.baseline.items():
        print(f"baseline {role} (holdout, realized): " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                                             if k != "n"))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .config import load_config
    from .report import build_report

    config = load_config(args.config)
    html = build_report(config)
    Path(args.out).write_text(html)
    print(f"wrote {args.out}")
    return 0


# -- parser ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="guarded-serving",
        description="Serve any trained model behind a guard: profile the training data, train a "
                    "fallback, check data, predict and serve.",
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("profile", help="build the training profile of a CSV/Parquet file")
    p.add_argument("data", help="training data (.csv or .parquet)")
    p.add_argument("--target", required=True, help="the target column")
    p.add_argument("--out", required=True, help="profile JSON to write")
    p.add_argument("--exclude", nargs="*", metavar="COL", help="columns that are not features")
    p.add_argument("--task", choices=["regression", "classification"], help="default: inferred from the target")
    p.add_argument("--bins", type=int, default=20, help="histogram bins per numeric feature (default 20)")
    p.add_argument("--primary", help="primary model file: records its predictions and holdout baseline")
    p.add_argument("--fallback", help="fallback model file: records its holdout baseline")
    p.add_argument("--holdout", help="held-out split for the baseline performance and for fitting "
                                     "performance estimation (written to PROFILE.estimation/)")
    p.add_argument("--trusted", action="store_true", help="allow loading pickle/joblib models")
    p.add_argument("--from-export", action="store_true",
                   help="the data comes from `guarded-serving export`: skip its log columns")
    p.add_argument("--time-index", nargs="+", metavar="COL",
                   help="columns that are the time of a row (a date, a year): not range-checked, "
                        "left out of the outlier score and the drift tests")
    p.add_argument("--categorical", nargs="+", metavar="COL",
                   help="profile these columns as categories, even if their values look like numbers")
    p.add_argument("--no-outlier", nargs="+", metavar="COL",
                   help="leave these columns out of the outlier score")
    p.add_argument("--max-categories", type=int, metavar="N",
                   help="keep the N most frequent values of a categorical column, the rest as other "
                        "(default 200)")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("fallback", help="train the interpretable fallback model and export it as ONNX")
    p.add_argument("data")
    p.add_argument("--target", required=True)
    p.add_argument("--task", required=True, choices=["regression", "classification"])
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--exclude", nargs="*", metavar="COL")
    p.add_argument("--alpha", type=float, default=1.0, help="ridge penalty (regression)")
    p.add_argument("--C", type=float, default=1.0, help="inverse regularisation (classification)")
    p.add_argument("--clip-margin", type=float, default=0.5,
                   help="clip inputs to the training range widened by this fraction of it (default 0.5)")
    p.add_argument("--name", default="fallback", help="model name recorded in the ONNX metadata")
    p.add_argument("--from-export", action="store_true",
                   help="DATA comes from 'guarded-serving export': skip its bookkeeping columns "
                        "and rows without an outcome")
    p.set_defaults(func=cmd_fallback)

    p = sub.add_parser("check", help="count rows that pass, go to the fallback or are rejected")
    p.add_argument("data")
    p.add_argument("--config", help="serving config: its profile, policy and time index apply")
    p.add_argument("--profile", help="profile JSON (default: the config's)")
    p.add_argument("--policy", help='policy overrides as JSON, e.g. \'{"range_margin": 0.1}\'')
    p.add_argument("--time-index", nargs="+", metavar="COL", help="columns that are the time of a row")
    p.add_argument("--drift-by", choices=["day", "week", "month", "quarter", "year"],
                   help="also test drift per calendar period of the datetime time index")
    p.add_argument("--json", action="store_true", help="print the counts as JSON")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("predict", help="run the guarded model in-process over a file")
    p.add_argument("config", help="serving config YAML")
    p.add_argument("data")
    p.add_argument("--out", help="write rows with prediction, route and reasons (.parquet, .csv, .json or .jsonl)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("serve", help="serve a guarded model over HTTP with BentoML")
    p.add_argument("config", nargs="?", default=None, help="serving config (default: the example)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--workers", type=int, default=1)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("build", help="build a bento (BentoML's deployable unit) for a serving config: "
                                     "the config, its profile and models baked in")
    p.add_argument("config", help="serving config YAML")
    p.add_argument("--name", help="bento name (default: the config's name)")
    p.add_argument("--version", help="bento version (default: generated by BentoML)")
    p.add_argument("--base-image", help="docker.base_image for `bentoml containerize` (e.g. the local "
                                        "image of deploy/container/base-image.sh); default: BentoML's")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("export", help="write the prediction log (features, predictions, routes, "
                                      "outcomes) as a training set")
    p.add_argument("config", help="serving config YAML (names the store)")
    p.add_argument("--out", required=True, help="output .parquet, .csv, .json or .jsonl")
    p.add_argument("--since", help="only rows logged since an ISO time or a duration ago (24h, 7d)")
    p.add_argument("--with-outcomes-only", action="store_true", help="only rows with a true outcome")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("replay", help="score a candidate model on the logged rows with outcomes, "
                                      "beside the live primary, fallback and guarded answers")
    p.add_argument("config", help="serving config YAML (names the store and the profile)")
    p.add_argument("--candidate", required=True, metavar="MODEL",
                   help="the candidate: a .onnx file, a trusted .joblib/.pkl (with --trusted) or module:function")
    p.add_argument("--profile", help="the candidate's profile: its features are the columns it gets "
                                     "(default: the config's profile)")
    p.add_argument("--since", help="only rows logged since an ISO time or a duration ago (24h, 7d)")
    _replay_options(p)
    p.add_argument("--trusted", action="store_true", help="allow loading a pickle/joblib candidate")
    p.add_argument("--json", action="store_true", help="print the replay as JSON")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("retrain", help="run the config's retrain command on a fresh export and replay "
                                       "its candidate on the newest outcomes")
    p.add_argument("config", help="serving config YAML with a retrain: section")
    p.add_argument("--command", dest="command_line", metavar="CMD",
                   help="the training command (overrides retrain.command; placeholders as there)")
    p.add_argument("--since", help="export only rows logged since then (overrides retrain.since)")
    p.add_argument("--holdout", type=float, help="newest fraction of rows with outcomes kept for the "
                                                 "replay (overrides retrain.holdout, default 0.2)")
    _replay_options(p)
    p.add_argument("--json", action="store_true", help="print the run and its replay as JSON")
    p.set_defaults(func=cmd_retrain)


    for action, text in (("promote", "make the config's challenger the primary of every serving process"),
                         ("rollback", "go back to the primary before the last promotion")):
        p = sub.add_parser(action, help=f"{text} (recorded in the store; no restart)")
        p.add_argument("config", help="serving config (its store: and challenger:)")
        p.add_argument("--reason", default="", help="why, kept with the switch event")
        p.add_argument("--actor", default=None, help="who (default cli:<user>)")
        p.add_argument("--json", action="store_true", help="print the switch event as JSON")
        p.set_defaults(func=cmd_switch, action=action)

    p = sub.add_parser("migrate-store", help="bring a store written by an older guarded-serving to "
                                             "the current layout (serving does it when it opens one)")
    p.add_argument("config", help="serving config YAML (names the store)")
    p.add_argument("--dry-run", action="store_true",
                   help="say what would be migrated and leave an older store as it is")
    p.set_defaults(func=cmd_migrate_store)

    p = sub.add_parser("estimate", help="estimate accuracy or error of the primary, the fallback and "
                                        "the guarded service on a file without outcomes")
    p.add_argument("config", help="serving config YAML (its profile's estimation artefacts)")
    p.add_argument("data", help="rows to estimate (.csv or .parquet); a target column is ignored")
    p.add_argument("--json", action="store_true", help="print the estimates as JSON")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("report", help="render the drift and performance report as one HTML file")
    p.add_argument("config", help="serving config YAML (names the store)")
    p.add_argument("--out", default="drift.html")
    p.set_defaults(func=cmd_report)
    return ap


def _replay_options(p: argparse.ArgumentParser) -> None:
    from .replay import N_BOOT, SEED

    p.add_argument("--margin", default="0", metavar="M",
                   help="smallest difference that counts, in the metric's units or as a percentage of "
                        "the live value (2%%); exit status 1 when the candidate is worse by more (default 0)")
    p.add_argument("--resamples", type=int, default=N_BOOT, help=f"bootstrap resamples (default {N_BOOT})")
    p.add_argument("--seed", type=int, default=SEED, help=f"bootstrap seed (default {SEED})")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # `bentoml serve` imports from the working directory; so does the CLI, so a callable model
    # (`callable: mymodels:predict`) is found the same way by `predict` as by `serve`.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except GuardedServingError as e:
        print(f"error: {e.message}", file=sys.stderr)
        for p in e.problems[:20]:
            print(f"  - {json.dumps(p.to_dict(), default=str)}", file=sys.stderr)
        if len(e.problems) > 20:
            print(f"  ... and {len(e.problems) - 20} more", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
