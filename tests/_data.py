"""Small shared loaders for the core tests: the example's real data and models."""

from __future__ import annotations

from functools import cache
from pathlib import Path

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
