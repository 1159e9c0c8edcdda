"""The example's shift scenario, in-process: does the guard help where the primary is out of its depth?

    python bench/bench_shift.py

The primary (gradient boosting) was trained on diamonds under one carat; the serving file mixes
unseen small stones with larger ones. Prints the mean absolute error of the guarded model and of the
primary alone on the rows the guard flagged, and checks that unflagged rows get exactly the primary's
predictions. Results also go to bench/results/shift.json.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from guarded_serving.config import load_config  # noqa: E402
from guarded_serving.guard import GuardedModel  # noqa: E402


def main() -> None:
    gm = GuardedModel.from_config(load_config(ROOT / "models/diamonds/serving.yaml"))
    serve = pd.read_parquet(ROOT / "models/diamonds/data/serve.parquet")
    X, y = serve.drop(columns=["price"]), serve["price"].to_numpy()
    r = gm.predict(X)
    alone = gm.primary.predict(X).labels
    flagged = r.routes == "fallback"

    def mae(p: np.ndarray, m: np.ndarray) -> float:
        return float(np.abs(p[m] - y[m]).mean())

    out = {
        "rows": len(X),
        "flagged": int(flagged.sum()),
        "mae_flagged_guarded": mae(r.predictions, flagged),
        "mae_flagged_primary_alone": mae(alone, flagged),
        "mae_unflagged_guarded": mae(r.predictions, ~flagged),
        "mae_all_guarded": mae(r.predictions, np.ones(len(y), bool)),
        "mae_all_primary_alone": mae(alone, np.ones(len(y), bool)),
        "unflagged_equal_primary": bool(np.array_equal(r.predictions[~flagged], alone[~flagged])),
        "top_reasons": dict(Counter(x for rs in r.reasons for x in rs).most_common(5)),
    }
    print(f"{out['rows']} serving rows, {out['flagged']} flagged and sent to the fallback")
    print(f"MAE on flagged rows: guarded {out['mae_flagged_guarded']:.0f} vs primary alone "
          f"{out['mae_flagged_primary_alone']:.0f} "
          f"({1 - out['mae_flagged_guarded'] / out['mae_flagged_primary_alone']:.0%} lower)")
    print(f"MAE on all rows:     guarded {out['mae_all_guarded']:.0f} vs primary alone {out['mae_all_primary_alone']:.0f}")
    print(f"unflagged rows identical to the primary's predictions: {out['unflagged_equal_primary']}")
    print(f"top reasons: {out['top_reasons']}")
    (ROOT / "bench/results").mkdir(exist_ok=True)
    (ROOT / "bench/results/shift.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
