"""The ``guarded-serving`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from .errors import GuardedServingError

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


def write_table(df: pd.DataFrame, path: str | Path) -> None:
    p = Path(path)
    if p.suffix == ".csv":
        df.to_csv(p, index=False)
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
    from .profile import build_profile

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
                                holdout=holdout, source=str(args.data))
        bar.update()
    profile.save(args.out)
    kinds = Counter(f.kind for f in profile.features)
    print(f"profiled {profile.n_rows} rows, {len(profile.features)} features "
          f"({', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))}); task {profile.task}; "
          f"wrote {args.out} ({profile.content_hash[:19]}...)")
    for role, metrics in profile.baseline.items():
        print(f"baseline {role}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return 0


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
    from .policy import Policy
    from .profile import Profile

    profile = Profile.load(args.profile)
    policy = Policy.from_dict(json.loads(args.policy)) if args.policy else Policy()
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
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .config import load_config
    from .guard import GuardedModel

    config = load_config(args.config)
    gm = GuardedModel.from_config(config)
    data = read_table(args.data)
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


def cmd_export(args: argparse.Namespace) -> int:
    from .config import load_config
    from .profile import Profile
    from .store.sql import Store

    config = load_config(args.config)
    target = Profile.load(config.profile).target
    store = Store(config.store.url, prefix=config.store.table_prefix)
    since = _parse_time(args.since) if args.since else None
    with tqdm(total=1, desc="reading the prediction log", file=sys.stderr) as bar:
        df = store.joined(since=since, with_outcomes_only=args.with_outcomes_only)
        bar.update()
    out = export_frame(df, target)
    write_table(out, args.out)
    with_outcome = int(out[target].notna().sum()) if target in out else 0
    print(f"exported {len(out)} logged rows ({with_outcome} with outcomes) from {store.url_display} "
          f"to {args.out}; train the next model with --target {target}")
    return 0


def export_frame(df: pd.DataFrame, target: str) -> pd.DataFrame:
    """Flatten the prediction log for retraining: one column per feature, the outcome under the
    profile's target name, and the serving metadata (EXPORT_COLUMNS) beside them."""
    feats = pd.DataFrame([f if isinstance(f, dict) else {} for f in df.get("features", [])], index=df.index)
    meta = [c for c in EXPORT_COLUMNS if c in df.columns]
    out = pd.concat([feats, df[meta]], axis=1)
    out[target] = df["outcome"] if "outcome" in df.columns else None
    if "ts" in out:
        out["ts"] = pd.to_datetime(out["ts"], unit="s", utc=True)
    if "outcome_ts" in out:
        out["outcome_ts"] = pd.to_datetime(out["outcome_ts"], unit="s", utc=True)
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
    p.add_argument("--holdout", help="held-out split for the baseline performance")
    p.add_argument("--trusted", action="store_true", help="allow loading pickle/joblib models")
    p.add_argument("--from-export", action="store_true",
                   help="the data comes from `guarded-serving export`: skip its log columns")
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
    p.add_argument("--profile", required=True)
    p.add_argument("--policy", help='policy overrides as JSON, e.g. \'{"range_margin": 0.1}\'')
    p.add_argument("--json", action="store_true", help="print the counts as JSON")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("predict", help="run the guarded model in-process over a file")
    p.add_argument("config", help="serving config YAML")
    p.add_argument("data")
    p.add_argument("--out", help="write rows with prediction, route and reasons (.parquet or .csv)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("serve", help="serve a guarded model over HTTP with BentoML")
    p.add_argument("config", nargs="?", default=None, help="serving config (default: the example)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--workers", type=int, default=1)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="write the prediction log (features, predictions, routes, "
                                      "outcomes) as a training set")
    p.add_argument("config", help="serving config YAML (names the store)")
    p.add_argument("--out", required=True, help="output .parquet or .csv")
    p.add_argument("--since", help="only rows logged since an ISO time or a duration ago (24h, 7d)")
    p.add_argument("--with-outcomes-only", action="store_true", help="only rows with a true outcome")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="render the drift and performance report as one HTML file")
    p.add_argument("config", help="serving config YAML (names the store)")
    p.add_argument("--out", default="drift.html")
    p.set_defaults(func=cmd_report)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
