"""guarded-serving: serve any trained model behind a guard.

Every batch is checked against a profile of the training data and routed, row by row, to a simple
interpretable fallback model when it is out of range, the primary raises, or it misses its latency
budget.
"""

from .errors import GuardedServingError
from .policy import Policy
from .profile import Profile, build_profile

__all__ = ["GuardedServingError", "Policy", "Profile", "build_profile"]
__version__ = "0.1.0"
