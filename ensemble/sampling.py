"""How the next token is chosen from the mixture: the `Sampling` dataclass and `pick_token`."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sampling:
    """Decoding settings of one prompt.

    ``do_sample`` False: greedy (argmax of the mixture). Otherwise the mixture is sharpened by ``temperature``
    (p_i^(1/T), renormalised), cut to the smallest set of tokens whose probability reaches ``top_p``, and sampled
    with a generator seeded by ``seed`` (None: unseeded). ``stop``: the completion ends before the first of
    these strings. Every value is checked here (ValueError saying what is allowed).
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be True or False, got {self.do_sample!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"temperature must be a finite number > 0 (use do_sample=False for greedy), got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not math.isfinite(p) or not 0 < p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)
                                      or self.seed < 0):
            raise ValueError(f"seed must be a whole number >= 0 or None, got {self.seed!r}")
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ValueError(f"every stop string must be a non-empty string, got {s!r}")
        object.__setattr__(self, "stop", stops)

    def generator(self, offset: int = 0):
        """A torch CPU generator seeded with ``seed + offset`` (None when unseeded)."""
        import torch

        return None if self.seed is None else torch.Generator().manual_seed(int(self.seed) + offset)


def pick_token(probs, sampling: Sampling, generator) -> int:
    """Choose the next token from mixture probabilities (float32 [vocab]): greedy, or temperature + top-p."""
    import torch

    if not sampling.do_sample:
        return int(torch.argmax(probs))
    # Temperature acts on the mixture: p_i^(1/T), renormalised.
    p = torch.softmax(torch.log(probs.float().clamp_min(1e-30)) / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, order = torch.sort(p, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < sampling.top_p  # always keeps the most likely token
        p = torch.zeros_like(p).scatter(0, order[keep], sorted_p[keep])
        p = p / p.sum()
    return int(torch.multinomial(p.cpu(), 1, generator=generator))


def cut_at_stop(text: str, stops) -> tuple[str, bool]:
    """(``text`` up to, not including, the earliest stop string; whether one was found)."""
    hits = [text.index(s) for s in stops or () if s and s in text]
    return (text[: min(hits)], True) if hits else (text, False)
