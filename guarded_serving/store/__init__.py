"""SQLite and PostgreSQL persistence: drift segments, the prediction log, outcomes and events."""

from .logwriter import LogWriter
from .sql import JSON_COLUMNS, PREDICTION_COLUMNS, Store

__all__ = ["JSON_COLUMNS", "PREDICTION_COLUMNS", "LogWriter", "Store"]
