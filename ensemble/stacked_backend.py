"""The stacked backend's state: which expert sits in which slot of the `Stack`, and the lanes' KV caches.

Slots are keyed by (cluster_id, version): a reload brings a retrained expert into a new slot while requests in
flight keep theirs. A slot is pinned while lanes use it; unpinned slots beyond the capacity
(``max_loaded_experts``) are released least recently used first. The stack grows when one batch needs more
experts at once than the capacity (all of them pinned).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable

import numpy as np

from ensemble.stacked import Layout, Shape, Stack, causal_attention, head, hidden_states, score_lanes, tail_lanes

SCORE_BYTES = 256 << 20  # logits memory per scoring forward (lanes x tokens x vocab x 4 bytes)


class StackedBackend:
    """Every lane of every expert in one batched call per step (`ensemble.stacked`)."""

    name = "stacked"

    def __init__(self, shape: Shape, load_state: Callable[[int], tuple[str, dict]], version: Callable[[int], str],
                 capacity: int, device: str):
        self.stack = Stack(shape, max(1, capacity), device)
        self.shape, self.device, self.capacity = shape, device, max(1, capacity)
        self.max_positions = shape.max_positions
        self._load_state, self._version = load_state, version
        self._lock = threading.Lock()
        self._slots: OrderedDict[tuple[int, str], int] = OrderedDict()  # (cluster_id, version) -> slot, LRU
        self._pins: dict[int, int] = {}
        self._loading: dict[tuple[int, str], threading.Event] = {}

    # ------------------------------------------------------------------------------------------ slots
    def resident(self) -> set[int]:
        """Cluster ids whose current version is in a slot."""
        with self._lock:
            return {cid for (cid, version) in self._slots if version == self._version(cid)}

    def acquire(self, experts: list[int]) -> list[int]:
        """The slot of each expert's current version, loading it if needed; each returned slot is pinned once."""
        return [self._acquire_one(int(e)) for e in experts]

    def _acquire_one(self, cid: int) -> int:
        key = (cid, self._version(cid))
        while True:
            with self._lock:
                if key in self._slots:
                    slot = self._slots[key]
                    self._slots.move_to_end(key)
                    self._pins[slot] = self._pins.get(slot, 0) + 1
                    return slot
                waiting = self._loading.get(key)
                if waiting is None:
                    self._loading[key] = threading.Event()
                    slot = self._reserve()
                    break
            waiting.wait()  # another thread loads this expert; then take its slot
        try:
            _, state = self._load_state(cid)
            with self._lock:
                self.stack.write(slot, state)
                self._slots[key] = slot
        except BaseException:
            with self._lock:
                self._pins.pop(slot, None)
            raise
        finally:
            with self._lock:
                self._loading.pop(key).set()
        return slot

    def _reserve(self) -> int:
        """A slot for a new expert (called with the lock held): a free one, else the least recently used
        unpinned one, else a new one (the stack grows). The slot comes back pinned."""
        used = set(self._slots.values()) | {s for s, n in self._pins.items() if n}
        free = [s for s in range(self.stack.capacity) if s not in used]
        if not free and len(self._slots) >= self.capacity:
            victim = next((k for k, s in self._slots.items() if not self._pins.get(s)), None)
            if victim is not None:
                free = [self._slots.pop(victim)]
        if not free:
            free = [self.stack.capacity]
            self.stack.grow(self.stack.capacity + 1)
        self._pins[free[0]] = 1
        return free[0]

    def release(self, slots: list[int]) -> None:
        """Unpin slots; beyond the capacity, unpinned slots are given up least recently used first."""
        with self._lock:
            for slot in slots:
                self._pins[slot] = self._pins.get(slot, 1) - 1
            stale = [k for k, s in self._slots.items() if k[1] != self._version(k[0]) and not self._pins.get(s)]
            for key in stale:
                del self._slots[key]
            while len(self._slots) > self.capacity:
                victim = next((k for k, s in self._slots.items() if not self._pins.get(s)), None)
                if victim is None:
                    break
                del self._slots[victim]

    def compose(self, slots: tuple[int, ...]) -> dict:
        with self._lock:
            return self.stack.compose(slots)

    # ------------------------------------------------------------------------------------------ work
    def lanes(self) -> "StackedLanes":
        return StackedLanes(self)

    def logprobs(self, jobs: list[tuple[int, list[int]]]) -> list[np.ndarray]:
        """Teacher-forced next-token log-probabilities (float64 [len(ids) - 1]) of each (cluster_id, ids) job,
        in segments of max_positions tokens; lanes of up to ``capacity`` experts run in one forward."""
        segments = []  # (job, expert, segment)
        for j, (expert, ids) in enumerate(jobs):
            for start in range(0, len(ids) - 1, self.max_positions - 1):
                segments.append((j, int(expert), ids[start:start + self.max_positions]))
        parts: list[list[np.ndarray]] = [[] for _ in jobs]
        def run(chunk, weights, groups):
            return score_lanes(self.stack, weights, groups, [s[2] for s in chunk])

        for chunk, out in self._forwards(segments, run):
            for (j, _, _), lp in zip(chunk, out):
                parts[j].append(lp)
        return [np.concatenate(p) if p else np.zeros(0) for p in parts]

    def tail_probs(self, jobs: list[tuple[int, list[int], int]]) -> list:
        """Next-token probabilities (float32 tensors [m, vocab]) predicting the last m tokens of each
        (cluster_id, ids, m) job; ids must fit max_positions."""
        segments = [(j, int(expert), ids, m) for j, (expert, ids, m) in enumerate(jobs)]
        out: list = [None] * len(jobs)
        def run(chunk, weights, groups):
            return tail_lanes(self.stack, weights, groups, [s[2] for s in chunk], [s[3] for s in chunk])

        for chunk, probs in self._forwards(segments, run):
            for s, p in zip(chunk, probs):
                out[s[0]] = p
        return out

    def _forwards(self, segments: list[tuple], run):
        """Yield (chunk, run(chunk, weights, groups)) over ``segments`` (job, expert, ids, ...) grouped by up to
        ``capacity`` experts and chunked to bound the logits' memory."""
        import torch

        experts = sorted({s[1] for s in segments})
        for lo in range(0, len(experts), self.capacity):
            group = set(experts[lo:lo + self.capacity])
            for chunk in _chunks([s for s in segments if s[1] in group], self.shape.vocab):
                slots = self.acquire([s[1] for s in chunk])
                try:
                    composition = tuple(sorted(set(slots)))
                    with torch.inference_mode():
                        out = run(chunk, self.compose(composition),
                                  [composition.index(s) for s in slots])
                finally:
                    self.release(slots)
                yield chunk, out


def _chunks(segments: list, vocab: int) -> list[list]:
    """Segments in forwards of at most SCORE_BYTES of logits (always at least one segment)."""
    out, current, rows = [], [], 0
    for seg in segments:
        if current and (rows + len(seg[2])) * vocab * 4 > SCORE_BYTES:
            out.append(current)
            current, rows = [], 0
        current.append(seg)
        rows += len(seg[2])
    return out + ([current] if current else [])


def _context_logprobs(x, weights: dict, layout: Layout, contexts: list[list[int]], tokens, tail: int) -> list:
    """Per lane, log p of the last min(tail, len - 1) tokens of its context (float64, oldest first) from the
    prefill's hidden states x [lanes, length, hidden] (contexts right-padded in ``tokens`` [lanes, length])."""
    import torch

    device = x.device
    ends = torch.tensor([len(c) - 1 for c in contexts], device=device)  # the position predicting nothing
    pos = (ends[:, None] - tail + torch.arange(tail, device=device)[None, :]).clamp_min(0)  # [lanes, tail]
    hidden = x.gather(1, pos[:, :, None].expand(-1, -1, x.shape[-1]))
    logp = torch.log_softmax(layout.from_pad(head(weights, layout.to_pad(hidden)), tail).float(), dim=-1)
    own = logp.gather(2, tokens.gather(1, pos + 1)[:, :, None])[:, :, 0].double().cpu().numpy()
    return [own[i, tail - min(tail, len(c) - 1):] for i, c in enumerate(contexts)]


class StackedLanes:
    """KV caches of a batch's lanes ([rows, kv_heads, positions, head_dim] per layer, rows kept compact) and
    the composition of slots their experts occupy."""

    def __init__(self, backend: StackedBackend):
        self.b = backend
        self.K: list = []
        self.V: list = []
        self.rows_cap = self.pos_cap = 0
        self.order: list[int] = []     # lane id of each cache row
        self.slot: dict[int, int] = {}
        self.length: dict[int, int] = {}
        self._next = 0
        self._weights: dict[tuple, dict] = {}

    def _composition(self, slots: list[int]) -> tuple[tuple, dict]:
        """The weights a forward over lanes on ``slots`` runs with, changed as rarely as possible: the current
        composition while it holds every slot needed and is at most twice as large (experts without lanes only
        add zero rows), else the contiguous slot range around them when that is at most twice as large (a view
        of the stack: nothing copied), else exactly the slots needed (gathered once)."""
        need = set(slots)
        if self._weights:
            (key, weights), = self._weights.items()
            if need <= set(key) and len(key) <= 2 * len(need):
                return key, weights
        span = tuple(range(min(need), max(need) + 1))
        key = span if len(span) <= 2 * len(need) else tuple(sorted(need))
        self._weights = {key: self.b.compose(key)}
        return key, self._weights[key]

    def _ensure(self, rows: int, positions: int) -> None:
        import torch

        s = self.b.shape
        if rows <= self.rows_cap and positions <= self.pos_cap:
            return
        new_rows = max(rows, 2 * self.rows_cap, 4)
        new_pos = min(s.max_positions, max(positions, 2 * self.pos_cap, 64))
        dtype, device = self.b.stack.dtype, self.b.device

        def bigger(old):
            new = torch.zeros((new_rows, s.kv_heads, new_pos, s.head_dim), dtype=dtype, device=device)
            if old is not None:
                new[: old.shape[0], :, : old.shape[2]] = old
            return new

        self.K = [bigger(self.K[i] if self.K else None) for i in range(s.layers)]
        self.V = [bigger(self.V[i] if self.V else None) for i in range(s.layers)]
        self.rows_cap, self.pos_cap = new_rows, new_pos

    def add(self, experts: list[int], contexts: list[list[int]], tail: int = 0):
        """Prefill new lanes with their contexts; returns (lane ids, next-token probs float32 [n, vocab], and per
        lane log p of the last ``tail`` tokens of its context, oldest first: float64 [min(tail, len - 1)])."""
        import torch

        slots = self.b.acquire(experts)
        lanes = list(range(self._next, self._next + len(experts)))
        self._next += len(experts)
        first, length = len(self.order), max(len(c) for c in contexts)
        self._ensure(first + len(lanes), length)
        self.order += lanes
        for lane, slot, ctx in zip(lanes, slots, contexts):
            self.slot[lane], self.length[lane] = slot, len(ctx)
        # The composition the next decode step needs (every lane of the batch), used for this prefill already.
        key, weights = self._composition([*slots, *(self.slot[lane] for lane in self.order[:first])])
        layout = Layout.of([key.index(s) for s in slots], len(key), self.b.device)
        tokens = torch.zeros((len(lanes), length), dtype=torch.long)
        for i, ctx in enumerate(contexts):
            tokens[i, :len(ctx)] = torch.tensor(ctx)
        tokens = tokens.to(self.b.device)
        positions = torch.arange(length, device=self.b.device).expand(len(lanes), length)
        rows = slice(first, first + len(lanes))

        def attend(li, q, k, v):
            self.K[li][rows, :, :length], self.V[li][rows, :, :length] = k, v
            return causal_attention(q, k, v)

        last = torch.tensor([len(c) - 1 for c in contexts], device=self.b.device)
        with torch.inference_mode():
            x = layout.from_pad(hidden_states(self.b.stack, weights, layout, tokens, positions, attend), length)
            final = x[torch.arange(len(lanes), device=self.b.device), last][:, None, :]
            logits = layout.from_pad(head(weights, layout.to_pad(final)), 1)[:, 0]
            seen = _context_logprobs(x, weights, layout, contexts, tokens, tail) if tail else \
                [np.zeros(0)] * len(lanes)
            return lanes, torch.softmax(logits.float(), dim=-1), seen

    def step(self, lanes: list[int], tokens: list[int]):
        """The lanes consume one token each; returns next-token probs float32 [n, vocab] in input order."""
        import torch

        row_of = {lane: r for r, lane in enumerate(self.order)}
        order = sorted(range(len(lanes)), key=lambda i: row_of[lanes[i]])
        lanes = [lanes[i] for i in order]
        rows = [row_of[lane] for lane in lanes]
        lengths = [self.length[lane] for lane in lanes]
        self._ensure(len(self.order), max(lengths) + 1)
        slots = [self.slot[lane] for lane in lanes]
        key, weights = self._composition(slots)
        layout = Layout.of([key.index(s) for s in slots], len(key), self.b.device)
        device = self.b.device
        pos = torch.tensor(lengths, device=device)
        row_t = torch.tensor(rows, device=device)
        contiguous = rows == list(range(len(rows)))
        span = max(lengths) + 1
        mask = None if len(set(lengths)) == 1 else (torch.arange(span, device=device)[None, :] <= pos[:, None])

        def attend(li, q, k, v):
            self.K[li][row_t, :, pos], self.V[li][row_t, :, pos] = k[:, :, 0], v[:, :, 0]
            keys = self.K[li][: len(rows), :, :span] if contiguous else self.K[li][row_t, :, :span]
            values = self.V[li][: len(rows), :, :span] if contiguous else self.V[li][row_t, :, :span]
            import torch.nn.functional as F

            attn_mask = None if mask is None else mask[:, None, None]
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask,
                                                  enable_gqa=keys.shape[1] != q.shape[1])

        ids = torch.tensor(tokens, device=device)[torch.tensor(order, device=device)][:, None]
        with torch.inference_mode():
            x = hidden_states(self.b.stack, weights, layout, ids, pos[:, None], attend)
            probs = torch.softmax(layout.from_pad(head(weights, x), 1)[:, 0].float(), dim=-1)
        for lane in lanes:
            self.length[lane] += 1
        out = torch.empty_like(probs)
        out[torch.tensor(order, device=device)] = probs
        return out

    def remove(self, lanes: list[int]) -> None:
        """Free the lanes' cache rows (the last rows move into the holes) and unpin their slots."""
        gone = set(lanes) & set(self.order)
        for lane in sorted(gone, key=self.order.index, reverse=True):
            row, last = self.order.index(lane), len(self.order) - 1
            if row != last:
                for cache in (*self.K, *self.V):
                    cache[row] = cache[last]
                self.order[row] = self.order[last]
            self.order.pop()
        self.b.release([self.slot.pop(lane) for lane in gone])
        for lane in gone:
            self.length.pop(lane, None)
        if not self.order:
            self._weights.clear()

    def close(self) -> None:
        self.remove(list(self.order))
        self.K, self.V, self._weights = [], [], {}
