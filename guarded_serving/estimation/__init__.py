"""Performance before the labels arrive: estimates of a window's metrics from unlabeled rows.

Classifiers: confidence-based performance estimation (expected confusion counts from calibrated
probabilities). Regressors: direct loss estimation (models of |error| and error², in ONNX).
Everything is fitted on the holdout at profile time (``fit_estimation``); serving reads it with
numpy and onnxruntime only (``WindowEstimator``).
"""

from .artefact import Estimation, RoleEstimation, estimation_dir, fit_estimation
from .calibration import Calibration, expected_calibration_error, fit_calibration
from .errormodel import ErrorModel, FeatureEncoder
from .tally import ClassificationTally, RegressionTally
from .window import WindowEstimator, WindowTally

__all__ = [
    "Calibration",
    "ClassificationTally",
    "ErrorModel",
    "Estimation",
    "FeatureEncoder",
    "RegressionTally",
    "RoleEstimation",
    "WindowEstimator",
    "WindowTally",
    "estimation_dir",
    "expected_calibration_error",
    "fit_calibration",
    "fit_estimation",
]
