"""The sparse ensemble: routing, the decoding engine and its backends, and the `Ensemble` API
(`from ensemble import Ensemble`)."""
from __future__ import annotations

from ensemble.api import Ensemble

__all__ = ["Ensemble"]
