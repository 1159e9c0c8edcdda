"""Retrain the example's primary: the recipe of models/build.py, trained on the training data plus
the production rows of a prediction-log export that have outcomes.

`guarded-serving retrain` runs it (the config's `retrain.command`, run in this directory):

    retrain:
      command: "{python} retrain.py --export {export} --out {candidate}"

or by hand on a file written by `guarded-serving export`:

    python models/diamonds/retrain.py --export export.parquet --out candidate.onnx
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # models/build.py holds the recipe

from build import CATEGORICAL, NUMERIC, TARGET, export_primary, train_primary  # noqa: E402


def production_rows(path: Path) -> pd.DataFrame:
    """The export's rows with an outcome, as training rows (features and target only)."""
    df = pd.read_parquet(path) if path.suffix != ".csv" else pd.read_csv(path)
    missing = [c for c in (*NUMERIC, *CATEGORICAL, TARGET) if c not in df.columns]
    if missing:
        sys.exit(
            f"{path} lacks the column(s) {missing}: export with prediction_log.log_features on"
        )
    df = df[df[TARGET].notna()]
    out = df[NUMERIC].astype(float)
    for c in CATEGORICAL:
        out[c] = df[c].astype(str)
    out[TARGET] = df[TARGET].astype(float)
    return out.reset_index(drop=True)


def set_version(path: Path, version: str) -> None:
    """Name the retrained model's version in its ONNX metadata, so the log tells it apart."""
    import onnx

    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    onnx.helper.set_model_props(model, {**props, "version": version})
    onnx.save(model, str(path))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--export", type=Path, required=True, help="a `guarded-serving export` file")
    ap.add_argument("--out", type=Path, required=True, help="the candidate ONNX file to write")
    ap.add_argument(
        "--train",
        type=Path,
        default=HERE / "data" / "train.parquet",
        help="the original training data (default: the example's)",
    )
    ap.add_argument("--version", default=time.strftime("retrained-%Y%m%dT%H%M%SZ", time.gmtime()))
    args = ap.parse_args()

    train = pd.read_parquet(args.train)[[*NUMERIC, *CATEGORICAL, TARGET]]
    prod = production_rows(args.export)
    data = pd.concat([train, prod], ignore_index=True)
    start = time.monotonic()
    model = train_primary(data)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    export_primary(model, args.out)
    set_version(args.out, args.version)
    print(
        f"trained on {len(train)} training rows + {len(prod)} production rows with outcomes "
        f"in {time.monotonic() - start:.1f} s; wrote {args.out} (version {args.version})"
    )


if __name__ == "__main__":
    main()
