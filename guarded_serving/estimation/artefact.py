"""What estimation learns from the holdout, saved beside the profile, versioned and hashed.

``fit_estimation`` fits, per model role, a calibration map (classifiers) or two error models
(regressors: |error| and error², as ONNX files) on the holdout, never on training rows. It
writes ``estimation.json`` and the ONNX files into ``estimation_dir(profile_path)``
(``profile.json`` -> ``profile.estimation/``). The JSON records the profile's content hash and
each ONNX file's sha256, and carries its own content hash; ``Estimation.load`` checks all three.
A profile without that folder loads and serves as before, without estimates.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..errors import ProfileError
from ..profile import content_hash
from ..scoring import score
from .calibration import Calibration, fit_calibration
from .errormodel import LOSSES, FeatureEncoder, export_error_model, fit_error_model

if TYPE_CHECKING:
    from ..adapters.base import Model
    from ..profile import Profile

log = logging.getLogger(__name__)

FORMAT = "guarded-serving/estimation"
VERSION = 1
FILE = "estimation.json"


def estimation_dir(profile_path: str | Path) -> Path:
    """Where the estimation artefacts of a profile live: ``profile.json`` -> ``profile.estimation/``."""
    p = Path(profile_path)
    return p.with_name(p.stem + ".estimation")


@dataclass(frozen=True)
class RoleEstimation:
    """One model role's artefacts: a calibration (classification) or error model files
    (regression: loss -> file name) with their sha256; ``holdout`` is its realized metrics there."""

    calibration: Calibration | None = None
    error_models: dict[str, str] = field(default_factory=dict)
    error_model_sha256: dict[str, str] = field(default_factory=dict)
    holdout: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "calibration": self.calibration.to_dict() if self.calibration else None,
            "error_models": self.error_models,
            "error_model_sha256": self.error_model_sha256,
            "holdout": self.holdout,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoleEstimation:
        cal = d.get("calibration")
        return cls(
            Calibration.from_dict(cal) if cal else None,
            dict(d.get("error_models") or {}),
            dict(d.get("error_model_sha256") or {}),
            {str(k): float(v) for k, v in (d.get("holdout") or {}).items()},
        )


@dataclass(frozen=True)
class Estimation:
    """Everything a ``WindowEstimator`` needs, for one profile."""

    task: str
    profile_hash: str
    encoder: FeatureEncoder
    roles: dict[str, RoleEstimation]
    holdout_rows: int
    created_at: str = ""
    directory: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "created_at": self.created_at,
            "task": self.task,
            "profile_hash": self.profile_hash,
            "holdout_rows": self.holdout_rows,
            "encoder": self.encoder.to_dict(),
            "roles": {r: e.to_dict() for r, e in self.roles.items()},
        }
        body["content_hash"] = content_hash(body)
        return body

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / FILE).write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")

    @classmethod
    def load(cls, directory: str | Path, profile: Profile | None = None) -> Estimation:
        """Load and check: format, version, content hash, ONNX files' sha256 and, given the
        ``profile``, that it was fitted for that profile."""
        d = Path(directory)
        try:
            body = json.loads((d / FILE).read_text())
        except OSError as e:
            raise ProfileError(f"cannot read estimation {d / FILE}: {e.strerror}") from e
        except json.JSONDecodeError as e:
            raise ProfileError(f"estimation {d / FILE} is not valid JSON: {e}") from e
        if (
            not isinstance(body, dict)
            or body.get("format") != FORMAT
            or body.get("version") != VERSION
        ):
            raise ProfileError(f"{d / FILE}: not a guarded-serving estimation of version {VERSION}")
        if body.get("content_hash") != content_hash(body):
            raise ProfileError(
                f"{d / FILE}: content hash does not match its content; rebuild it with "
                "`guarded-serving profile ... --holdout`"
            )
        if profile is not None and body["profile_hash"] != profile.content_hash:
            raise ProfileError(
                f"{d / FILE} was fitted for profile {body['profile_hash'][:19]}..., not for "
                f"{profile.content_hash[:19]}...; rebuild it with the profile"
            )
        roles = {str(r): RoleEstimation.from_dict(e) for r, e in body["roles"].items()}
        for role in roles.values():
            for loss, name in role.error_models.items():
                digest = _sha256(d / name)
                if digest != role.error_model_sha256.get(loss):
                    raise ProfileError(
                        f"{d / name}: sha256 {digest[:19]}... is not the one {FILE} records"
                    )
        return cls(
            task=str(body["task"]),
            profile_hash=str(body["profile_hash"]),
            encoder=FeatureEncoder.from_dict(body["encoder"]),
            roles=roles,
            holdout_rows=int(body["holdout_rows"]),
            created_at=str(body.get("created_at", "")),
            directory=d,
        )


def _sha256(path: Path) -> str:
    try:
        return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        raise ProfileError(f"cannot read error model {path}: {e.strerror}") from e


def fit_estimation(
    profile: Profile,
    holdout: pd.DataFrame,
    models: Mapping[str, Model | None],
    directory: str | Path,
) -> Estimation:
    """Fit on ``holdout`` (features and the profile's target) what estimation needs for each
    model role ("primary", "fallback"), write it into ``directory`` and return it. Needs
    scikit-learn (and skl2onnx for regressors)."""
    if profile.target not in holdout.columns:
        raise ProfileError(f"the holdout has no target column {profile.target!r}")
    holdout = holdout[holdout[profile.target].notna()]
    if len(holdout) < 50:
        raise ProfileError(
            f"estimation needs at least 50 holdout rows with a target, got {len(holdout)}"
        )
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    encoder = FeatureEncoder.from_profile(profile)
    features = holdout[profile.feature_names]
    matrix = encoder.matrix(features)
    y = holdout[profile.target].to_numpy()
    roles: dict[str, RoleEstimation] = {}
    for role, model in models.items():
        if model is None:
            continue
        pred = model.predict(features)
        realized = score(profile.task, y, pred.labels, pred)
        if profile.task == "classification":
            if pred.probabilities is None or pred.classes is None:
                log.warning("the %s model gives no probabilities: no estimates for it", role)
                continue
            cal = fit_calibration(y, pred.probabilities, list(pred.classes))
            roles[role] = RoleEstimation(calibration=cal, holdout=realized)
            continue
        err = np.asarray(pred.labels, dtype=float) - y.astype(float)
        files, digests = {}, {}
        for loss, target in zip(LOSSES, (np.abs(err), err**2), strict=True):
            name = f"{role}.{loss}.onnx"
            export_error_model(
                fit_error_model(matrix, pred.labels, target), matrix.shape[1] + 1, d / name
            )
            files[loss], digests[loss] = name, _sha256(d / name)
        roles[role] = RoleEstimation(
            error_models=files, error_model_sha256=digests, holdout=realized
        )
    est = Estimation(
        task=profile.task,
        profile_hash=profile.content_hash,
        encoder=encoder,
        roles=roles,
        holdout_rows=len(holdout),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        directory=d,
    )
    est.save(d)
    return est
