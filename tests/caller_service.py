"""Another BentoML service that calls the guarded service the BentoML way, ``bentoml.depends(url=...)``
(used by tests/test_security.py)."""

from __future__ import annotations

import os
from typing import Any

import bentoml
from bentoml.exceptions import BentoMLException


@bentoml.service
class Caller:
    guarded = bentoml.depends(url=os.environ.get("GUARDED_URL", "http://127.0.0.1:3000"))

    @bentoml.api
    async def price(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        try:
            answer = await self.guarded.to_async.predict(rows=rows)
        except BentoMLException as e:  # our JSON error body, with its status
            return {"status": int(e.error_code), "error": str(e)}
        return {"status": 200, "answer": answer}
