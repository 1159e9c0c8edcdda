"""Runs alibi-detect's TabularDrift on the windows bench_drift.py wrote; prints one JSON line.

Runs inside .bench-venvs/alibi (alibi-detect 0.13 pins numpy<2), never in the project's env:

    .bench-venvs/alibi/bin/python bench/alibi_runner.py DATA_DIR

DATA_DIR holds ref.npz (x_ref: training features, categorical columns as integer codes;
categorical: their column indices), one scenario_*.npz per scenario and window size (pool: the
rows windows are drawn from; idx: windows x rows indices into pool) and speed_*.npz (x: one
window). Settings follow alibi-detect's defaults: p_val=0.05, Bonferroni over the features.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np


def main() -> None:
    data = Path(sys.argv[1])
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    import alibi_detect
    from alibi_detect.cd import TabularDrift

    ref = np.load(data / "ref.npz")
    x_ref = ref["x_ref"]
    cats = {int(j): None for j in ref["categorical"]}
    t = time.perf_counter()
    cd = TabularDrift(x_ref, p_val=0.05, categories_per_feature=cats, correction="bonferroni")
    init_s = time.perf_counter() - t

    scenarios = {}
    for path in sorted(data.glob("scenario_*.npz")):
        d = np.load(path)
        pool, idx = d["pool"], d["idx"]
        flags, times = [], []
        for rows in idx:
            t = time.perf_counter()
            out = cd.predict(pool[rows])
            times.append(time.perf_counter() - t)
            flags.append(int(out["data"]["is_drift"]))
        scenarios[path.stem.removeprefix("scenario_")] = {
            "drift_rate": float(np.mean(flags)),
            "windows": len(flags),
            "predict_ms_median": float(np.median(times) * 1e3),
        }

    speed = {}
    for path in sorted(data.glob("speed_*.npz")):
        x = np.load(path)["x"]
        cd.predict(x)  # warm up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            cd.predict(x)
            times.append(time.perf_counter() - t)
        speed[str(len(x))] = float(np.median(times) * 1e3)

    print(json.dumps({"alibi_detect": alibi_detect.__version__, "init_s": init_s,
                      "scenarios": scenarios, "predict_ms": speed}))


if __name__ == "__main__":
    main()
