"""SQLite and PostgreSQL persistence: drift segments, the prediction log, outcomes and events."""

from .logbatch import LogBatch
from .sql import JSON_COLUMNS, PREDICTION_COLUMNS, Store

__all__ = ["JSON_COLUMNS", "PREDICTION_COLUMNS", "LogBatch", "Store"]
