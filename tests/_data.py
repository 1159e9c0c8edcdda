"""Small shared loaders for the core tests: the example's real data and models."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "models" / "diamonds"
CONFIG = EXAMPLE / "serving.yaml"
TARGET = "price"


@cache
def _read(name: str) -> pd.DataFrame:
    return pd.read_parquet(EXAMPLE / "data" / f"{name}.parquet")


def train() -> pd.DataFrame:
    return _read("train").copy()


def holdout() -> pd.DataFrame:
    return _read("holdout").copy()


def serve() -> pd.DataFrame:
    return _read("serve").copy()


def features(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=[TARGET])


def json_rows(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as a client sends them in {"rows": [...]} (plain JSON values)."""
    return json.loads(df.to_json(orient="records"))  # type: ignore[no-any-return]
