"""The peer for bench_service.py: a plain BentoML service serving the same ONNX model, the way a
BentoML user would write it without guarded-serving (no checks, no fallback, no monitoring).

    bentoml serve bench.plain_service:PlainService --port 3001
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bentoml
import numpy as np

MODEL = Path(__file__).resolve().parents[1] / "models" / "diamonds" / "primary.onnx"


@bentoml.service(workers=1, traffic={"timeout": 60})
class PlainService:
    def __init__(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(MODEL), opts, providers=["CPUExecutionProvider"])
        self.inputs = [(i.name, i.type) for i in self.session.get_inputs()]

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
