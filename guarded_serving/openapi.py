"""The service's own routes described twice from one set of JSON schemas: an OpenAPI 3.1 document
(``/docs.json``, for generated clients, Swagger UI and fuzzers) and BentoML's ``/schema.json`` (what
``bentoml.SyncHTTPClient``, ``AsyncHTTPClient`` and ``bentoml.depends(url=...)`` read to find
their methods). Pure: no HTTP here, the service module serves both.

>>> doc = openapi_document("m", "regression", [("carat", "numeric")], max_rows=10)
>>> sorted(doc["paths"])
['/admin/promote', '/admin/rollback', '/drift', '/feedback', '/performance', '/predict', '/profile']
>>> [r["name"] for r in bentoml_schema("m", "regression", [("carat", "numeric")], 10)["routes"]]
['predict', 'feedback']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

OPENAPI_VERSION = "3.1.0"

_VALUE_BY_KIND: dict[str, dict[str, Any]] = {
    "numeric": {"type": ["number", "null"]},
    "integer": {"type": ["number", "null"]},
    "boolean": {"type": ["boolean", "null"]},
    "categorical": {"type": ["string", "number", "boolean", "null"]},
}

PROBLEM = {
    "type": "object",
    "description": "One thing wrong with the input: where (row, column), what was expected, what came.",
    "properties": {
        "problem": {"type": "string"},
        "row": {"type": ["integer", "null"]},
        "column": {"type": ["string", "null"]},
        "expected": {"type": "string"},
        "got": {},
    },
    "required": ["problem"],
}

ERROR = {
    "type": "object",
    "description": "Every 4xx and 5xx answer of every route. Internal details (exception text, "
                   "store URLs, paths) are only in the server's log.",
    "properties": {
        "error": {"type": "string", "description": "stable code, e.g. schema_violation"},
        "message": {"type": "string"},
        "problems": {"type": "array", "items": PROBLEM},
        "request_id": {"type": "string"},
    },
    "required": ["error", "message"],
}


def _outcome(task: str) -> dict[str, Any]:
    return {"type": "number"} if task == "regression" else {"type": ["string", "integer", "boolean"]}


def request_schemas(task: str, features: Sequence[tuple[str, str]], max_rows: int) -> dict[str, Any]:
    """JSON schemas of the request bodies, by route."""
    row = {
        "type": "object",
        "description": "One row: a value per profile feature; other keys are ignored or rejected "
                       "(policy.extra_columns).",
        "properties": {name: _VALUE_BY_KIND.get(kind, {}) for name, kind in features},
        "required": [name for name, _ in features],
    }
    item = {"type": "object",
            "properties": {"request_id": {"type": "string"}, "row": {"type": "integer", "minimum": 0},
                           "outcome": _outcome(task)},
            "required": ["request_id", "row", "outcome"]}
    return {
        "predict": {
            "type": "object",
            "properties": {
                "rows": {"type": "array", "items": row, "minItems": 1, "maxItems": max_rows},
                "on_reject": {"type": "string", "enum": ["raise", "mark"], "default": "raise",
                              "description": "raise: 422 for the batch; mark: answer the other rows"},
            },
            "required": ["rows"],
        },
        "feedback": {
            "type": "object",
            "description": "Either request_id with outcomes (one per row of that request), or items.",
            "properties": {
                "request_id": {"type": "string"},
                "outcomes": {"type": "array", "items": _outcome(task), "minItems": 1},
                "items": {"type": "array", "items": item, "minItems": 1},
                "overwrite": {"type": "boolean", "default": False},
            },
        },
    }


def response_schemas(task: str) -> dict[str, Any]:
    """JSON schemas of the successful answers, by route."""
    label = {"type": ["number", "null"]} if task == "regression" else {}
    predict = {
        "type": "object",
        "properties": {
            "request_id": {"type": "string"},
            "predictions": {"type": "array", "items": label},
            "routes": {"type": "array", "items": {"type": "string", "enum": ["primary", "fallback", "rejected"]}},
            "reasons": {"type": "array", "items": {"type": "array", "items": {"type": "string"}}},
            "timing_ms": {"type": "object", "additionalProperties": {"type": "number"}},
            "classes": {"type": "array"},
            "probabilities": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
            "problems": {"type": "array", "items": PROBLEM},
            "extra_columns": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["request_id", "predictions", "routes", "reasons", "timing_ms"],
    }
    feedback = {
        "type": "object",
        "properties": {k: {"type": "integer"} for k in ("received", "stored", "unchanged", "overwritten")},
        "required": ["received"],
    }
    view = {"type": "object", "additionalProperties": True}
    return {"predict": predict, "feedback": feedback, "profile": view, "drift": view, "performance": view,
            "admin/promote": view, "admin/rollback": view}


#: (path, method, summary, error statuses) of each route, in the order documented.
ROUTES = (
    ("/predict", "post", "Guarded predictions for a batch of rows", (400, 401, 409, 413, 415, 422, 429, 503)),
    ("/feedback", "post", "True outcomes for logged rows", (400, 401, 404, 409, 413, 415, 422, 429, 503)),
    ("/profile", "get", "Summary of the loaded training profile", (401, 429)),
    ("/drift", "get", "Drift over windows of live traffic, merged across workers", (401, 404, 429, 503)),
    ("/performance", "get", "Live performance on rows with outcomes", (400, 401, 429, 503)),
    ("/admin/promote", "post", "Promote the challenger to primary, in every worker and replica "
     "(token required)", (400, 401, 409, 415, 429, 503)),
    ("/admin/rollback", "post", "Roll back to the previous primary, in every worker and replica "
     "(token required)", (400, 401, 409, 415, 429, 503)),
)
#: The optional body of the /admin routes: who switched, and why (kept with the switch event).
SWITCH_REQUEST = {"type": "object", "properties": {"reason": {"type": "string"}, "actor": {"type": "string"}}}


def openapi_document(name: str, task: str, features: Sequence[tuple[str, str]], max_rows: int,
                     version: str = "1") -> dict[str, Any]:
    """The OpenAPI 3.1 document of the guarded service's routes."""
    requests = request_schemas(task, features, max_rows)
    responses = response_schemas(task)
    error = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    paths: dict[str, Any] = {}
    for path, method, summary, errors in ROUTES:
        key = path.strip("/")
        op: dict[str, Any] = {
            "operationId": key.replace("/", "_"),
            "summary": summary,
            "responses": {
                "200": {"description": "OK", "content": {"application/json": {"schema": responses[key]}}},
                **{str(s): error for s in errors},
                "500": error,
            },
            "security": [{}, {"bearer": []}],
        }
        if key in requests:
            op["requestBody"] = {"required": True,
                                 "content": {"application/json": {"schema": requests[key]}}}
        if key.startswith("admin/"):
            op["requestBody"] = {"required": False, "content": {"application/json": {"schema": SWITCH_REQUEST}}}
            op["security"] = [{"bearer": []}]
        if key == "performance":
            op["parameters"] = [
                {"name": "since", "in": "query", "schema": {"type": "number"},
                 "description": "only outcomes logged since this Unix time"},
                {"name": "window_rows", "in": "query", "schema": {"type": "integer", "minimum": 1}},
            ]
        paths[path] = {method: op}
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": f"guarded-serving: {name}", "version": version,
                 "description": "A model behind a guard: rows are checked against the training "
                                "profile; rows that fail go to an interpretable fallback."},
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR, "Problem": PROBLEM},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def bentoml_schema(name: str, task: str, features: Sequence[tuple[str, str]], max_rows: int) -> dict[str, Any]:
    """BentoML's ``/schema.json`` for the POST routes its clients can call (``client.predict(rows=...)``,
    ``client.feedback(...)``): the same routes as the Starlette app, no ``@bentoml.api`` in between."""
    requests = request_schemas(task, features, max_rows)
    responses = response_schemas(task)
    docs = {path.strip("/"): summary for path, method, summary, _ in ROUTES if method == "post"}
    return {
        "name": name,
        "type": "service",
        "description": "A model behind a guard (guarded-serving); the full API is at /docs.json.",
        "routes": [
            {"name": key, "route": f"/{key}", "description": docs[key], "batchable": False,
             "input": requests[key], "output": responses[key], "doc": docs[key], "is_task": False}
            for key in ("predict", "feedback")
        ],
        "paths": {path: {"mounted": True} for path, *_ in ROUTES},
    }
