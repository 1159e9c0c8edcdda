"""The peer for bench_service.py: a plain BentoML service serving the same ONNX model, the way a
BentoML user would write it without guarded-serving (no checks, no fallback, no monitoring).

    bentoml serve bench.plain_service:PlainService --port 3001
    PLAIN_TUNED=1 bentoml serve bench.plain_service:PlainService --port 3002

With ``PLAIN_TUNED=1`` its worker gets the process settings the guarded worker gives itself:
BentoML's per-request timer cancelled (guarded_serving/traffic_timeout.py), the startup heap
frozen, and the garbage collector's thresholds and GIL switch interval of interpreter.py. It
answers how much of the gap to plain BentoML is guarding and monitoring, and how much is those.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import bentoml
import numpy as np

MODEL = Path(__file__).resolve().parents[1] / "models" / "diamonds" / "primary.onnx"
TUNED = bool(os.environ.get("PLAIN_TUNED"))
if TUNED:
    from guarded_serving import traffic_timeout

    traffic_timeout.install()


@bentoml.service(workers=1, traffic={"timeout": 60})
class PlainService:
    def __init__(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(MODEL), opts, providers=["CPUExecutionProvider"])
        self.inputs = [(i.name, i.type) for i in self.session.get_inputs()]
        if TUNED:
            from guarded_serving import interpreter

            interpreter.tune()

    @bentoml.api
    def predict(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        feeds = {}
        for name, kind in self.inputs:
            values = [r[name] for r in rows]
            if "string" in kind:
                feeds[name] = np.array(values, dtype=object).reshape(-1, 1)
            else:
                feeds[name] = np.array(values, dtype=np.float32).reshape(-1, 1)
        out = self.session.run(None, feeds)[0]
        return {"predictions": np.asarray(out, dtype=np.float64).reshape(-1).tolist()}
