"""Drift monitoring, pure: mergeable counts (``state``), statistics on them (``stats``) and
windows cut at read time from the segments workers flush (``windows``).

>>> import numpy as np, pandas as pd
>>> from guarded_serving.profile import build_profile
>>> p = build_profile(pd.DataFrame({"x": np.arange(1000.0), "y": np.zeros(1000)}), target="y")
>>> live = DriftState.empty(p)
>>> live.update({"x": np.arange(0.0, 1000.0, 2.0)}, now=0.0)
>>> evaluate(live, p)["status"]
'ok'
"""

from .state import DriftState, FeatureCounts
from .stats import DriftThresholds, evaluate
from .windows import Segment, Window, archive, assemble_windows, compact, drift_view, status_changes

__all__ = [
    "archive",
    "DriftState",
    "DriftThresholds",
    "FeatureCounts",
    "Segment",
    "Window",
    "assemble_windows",
    "compact",
    "drift_view",
    "evaluate",
    "status_changes",
]
