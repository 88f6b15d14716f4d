"""Configuration of routing and inference."""
from __future__ import annotations

from dataclasses import dataclass

from ensemble.rundir import UserInputError


@dataclass
class EnsembleConfig:
    """Routing defaults stored in the manifest.

    ``temperature`` T in softmax(-d^2 / T) over squared distances to the centroids; ``route_window``:
    when scoring, the weights for a token come from the embedding of at most this many preceding tokens,
    recomputed once per window of this many tokens (so no prefix is embedded token by token).
    """

    top_k: int = 2
    temperature: float = 0.1
    route_window: int = 32

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise UserInputError(f"ensemble.top_k must be >= 1, got {self.top_k}")
        if self.temperature <= 0:
            raise UserInputError(f"ensemble.temperature must be > 0, got {self.temperature}")
        if self.route_window < 1:
            raise UserInputError(f"ensemble.route_window must be >= 1, got {self.route_window}")
