"""The challenger: a model scored in shadow on live traffic beside the primary, so that outcomes
show whether it would do better before anyone promotes it (``guarded-serving promote``).

It runs in the recorder's consumer thread, on the batch of many requests the recorder already
assembled (the shadow path of the fallback and the primary), never on the request path: on the
answered (not rejected) rows, optionally a random ``sample_rate`` share of them. A challenger that
fails scores nothing for that batch; serving never notices.

>>> ch = load_challenger(load_config("models/diamonds/serving.yaml"))  # doctest: +SKIP
>>> shadow_challenger(ch, columns, routes)  # doctest: +SKIP
array([612.3, None, 4410.0], dtype=object)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from .adapters import Model
from .config import ChallengerSpec, ServingConfig
from .drift.state import DriftState
from .drift.stats import DriftThresholds, evaluate
from .errors import ConfigError
from .guard import REJECTED, load_model_spec, predict_on_columns
from .profile import Profile

log = logging.getLogger(__name__)

__all__ = ["Challenger", "challenger_drift", "load_challenger", "shadow_challenger"]


@dataclass(frozen=True)
class Challenger:
    """A loaded challenger: its model, the profile its checks would use once promoted, the
    version it is logged (and promoted) under and the share of rows it scores."""

    model: Model
    profile: Profile
    version: str
    sample_rate: float
    spec: ChallengerSpec


def load_challenger(config: ServingConfig) -> Challenger | None:
    """The config's challenger, loaded (None when it names none). Its profile defaults to the
    primary's; a profile for another task than the config's is a ConfigError."""
    spec = config.challenger
    if spec is None:
        return None
    model = load_model_spec(spec, config.task, "challenger")
    profile = Profile.load(spec.profile or config.profile)
    if profile.task != config.task:
        raise ConfigError(
            f"challenger.profile: its task is {profile.task!r}, the config's {config.task!r}"
        )
    version = str(spec.version or model.version or "")
    return Challenger(model, profile, version, spec.sample_rate, spec)


def shadow_challenger(
    challenger: Challenger,
    columns: dict[str, np.ndarray],
    routes: np.ndarray,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """The challenger's answers for the answered rows of a recorded batch (an object array, None
    where it did not score: rejected rows, rows sampled out, a failed call). Never raises."""
    out = np.full(len(routes), None, dtype=object)
    mask = routes != REJECTED
    if challenger.sample_rate < 1.0:
        mask &= (rng or np.random.default_rng()).random(len(routes)) < challenger.sample_rate
    idx = np.flatnonzero(mask)
    if not idx.size:
        return out
    try:
        pred = predict_on_columns(challenger.model, {k: v[idx] for k, v in columns.items()})
        if len(pred) == idx.size:
            out[idx] = _values(pred.labels)
    except Exception as e:  # a challenger is on trial: its failure is logged, never served
        log.warning("challenger %s failed on %d row(s): %s", challenger.version, idx.size, e)
    return out


def challenger_drift(challenger: Challenger, predictions: Any, min_rows: int) -> dict[str, Any]:
    """The drift of the challenger's logged predictions against its own profile's predictions on
    training data (as ``/drift`` judges the primary's): ``{"version", "rows", "prediction"}``,
    ``prediction`` None when its profile records no predictions."""
    values = np.asarray([v for v in predictions if v is not None], dtype=object)
    state = DriftState.empty(challenger.profile)
    if len(values):
        state.update({}, values)
    result = evaluate(state, challenger.profile, DriftThresholds(min_rows=min_rows))
    return {
        "version": challenger.version,
        "rows": int(state.rows),
        "prediction": result["prediction"],
    }


def _values(labels: Any) -> list[Any]:
    return np.asarray(labels).tolist()
