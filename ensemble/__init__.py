"""The sparse ensemble: run directory, routing and the inference API (`from ensemble import Ensemble`)."""
from __future__ import annotations

__all__ = ["Ensemble"]


def __getattr__(name: str):
    # Imported lazily so that stages can use ensemble.rundir without loading torch/transformers.
    if name == "Ensemble":
        from ensemble.api import Ensemble

        return Ensemble
    raise AttributeError(name)
