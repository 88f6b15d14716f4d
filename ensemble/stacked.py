"""The stacked backend: experts branched from one Llama-shaped seed have the same shapes, so their weights
live stacked on a leading expert dimension and every lane of every expert runs in one batched call per step.

Weights: one slot per loaded expert, each parameter a tensor [slots, ...] in Hugging Face's own [out, in]
layout (so every projection equals `F.linear` of the expert's own model). A forward runs over a *composition*
(the slots its lanes use): the stack itself when every slot is used, else those slots gathered once per change
of composition. Activations are laid out [experts, lanes per expert, tokens, width] for the projections
(`torch.bmm`), and per lane for attention over the lanes' KV caches. `ensemble.stacked_backend` holds the
slots and the lanes' KV caches.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LAYER_PARAMS = ("ln1", "ln2", "qkv", "o", "gu", "down")


@dataclass(frozen=True)
class Shape:
    """The shapes a stack needs, read from a Llama config."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    eps: float
    theta: float
    tied: bool
    max_positions: int

    @classmethod
    def of(cls, config) -> "Shape":
        heads = int(config.num_attention_heads)
        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        return cls(int(config.vocab_size), int(config.hidden_size), int(config.num_hidden_layers), heads,
                   int(getattr(config, "num_key_value_heads", None) or heads),
                   int(getattr(config, "head_dim", None) or config.hidden_size // heads),
                   int(config.intermediate_size), float(config.rms_norm_eps), float(theta),
                   bool(getattr(config, "tie_word_embeddings", True)), int(config.max_position_embeddings))


def unstackable_reason(config) -> str | None:
    """Why a model with this config cannot be stacked (None: it can): only plain Llama decoders are."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    checks = [(getattr(config, "model_type", None) == "llama", f"model type {getattr(config, 'model_type', None)}"),
              (getattr(config, "hidden_act", "silu") == "silu", f"activation {getattr(config, 'hidden_act', None)}"),
              (not getattr(config, "attention_bias", False), "attention biases"),
              (not getattr(config, "mlp_bias", False), "MLP biases"),
              (rope.get("rope_type", rope.get("type", "default")) == "default", "scaled rotary positions")]
    return next((why for ok, why in checks if not ok), None)


def _rms(x, weight, eps: float):
    """Llama RMSNorm (in float32, as transformers computes it); weight broadcasts over the leading dims."""
    return x * __import__("torch").rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate_half(x):
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Stack:
    """Weights of up to ``capacity`` experts stacked slot by slot, and the forward pass over them."""

    def __init__(self, shape: Shape, capacity: int, device: str, dtype=None):
        import torch

        self.shape, self.device = shape, device
        self.dtype = dtype or torch.float32
        s, d, hd = shape, shape.hidden, shape.head_dim
        qkv = (s.heads + 2 * s.kv_heads) * hd
        self._shapes = {"emb": (s.vocab, d), "norm": (d,), "ln1": (d,), "ln2": (d,), "qkv": (qkv, d),
                        "o": (d, s.heads * hd), "gu": (2 * s.inter, d), "down": (d, s.inter)}
        if not s.tied:
            self._shapes["head"] = (s.vocab, d)
        self.capacity = 0
        self.tensors: dict[str, object] = {}
        self.layers: list[dict[str, object]] = []
        self.grow(capacity)
        inv = 1.0 / (s.theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
        freqs = torch.arange(s.max_positions, dtype=torch.float32)[:, None] * inv[None, :]
        table = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = table.cos().to(device), table.sin().to(device)  # [max_positions, head_dim]

    def grow(self, capacity: int) -> None:
        """Room for ``capacity`` slots (existing slots keep their weights)."""
        import torch

        if capacity <= self.capacity:
            return

        def bigger(old, shape):
            new = torch.zeros((capacity, *shape), dtype=self.dtype, device=self.device)
            if old is not None:
                new[: old.shape[0]] = old
            return new

        for name in ("emb", "norm", "head"):
            if name in self._shapes:
                self.tensors[name] = bigger(self.tensors.get(name), self._shapes[name])
        self.layers = [{p: bigger(self.layers[i][p] if self.layers else None, self._shapes[p]) for p in LAYER_PARAMS}
                       for i in range(self.shape.layers)]
        self.capacity = capacity

    def write(self, slot: int, state: dict) -> None:
        """Copy one expert's Hugging Face state dict (``model.layers.N...`` names) into ``slot``."""
        import torch

        with torch.no_grad():
            self.tensors["emb"][slot].copy_(state["model.embed_tokens.weight"])
            self.tensors["norm"][slot].copy_(state["model.norm.weight"])
            if "head" in self.tensors:
                self.tensors["head"][slot].copy_(state["lm_head.weight"])
            for i, layer in enumerate(self.layers):
                p = f"model.layers.{i}."
                layer["ln1"][slot].copy_(state[p + "input_layernorm.weight"])
                layer["ln2"][slot].copy_(state[p + "post_attention_layernorm.weight"])
                layer["qkv"][slot].copy_(torch.cat([state[p + f"self_attn.{n}_proj.weight"] for n in "qkv"], 0))
                layer["o"][slot].copy_(state[p + "self_attn.o_proj.weight"])
                layer["gu"][slot].copy_(torch.cat([state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"]]))
                layer["down"][slot].copy_(state[p + "mlp.down_proj.weight"])

    def compose(self, slots: tuple[int, ...]) -> dict:
        """The weights of ``slots`` (in that order) as tensors [len(slots), ...]: views of the stack when the
        slots are a contiguous ascending range, else a gathered copy."""
        import torch

        first = slots[0]
        if list(slots) == list(range(first, first + len(slots))):
            take = lambda t: t[first:first + len(slots)]  # noqa: E731  (a view: nothing is copied)
        else:
            index = torch.tensor(slots, device=self.device)
            take = lambda t: t.index_select(0, index)  # noqa: E731
        out = {name: take(t) for name, t in self.tensors.items()}
        out["layers"] = [{p: take(t) for p, t in layer.items()} for layer in self.layers]
        out["slots"] = tuple(slots)
        return out


@dataclass
class Layout:
    """Where each of n lanes sits in a composition's [experts, lanes per expert] layout.

    ``group`` int64 [n]: the lane's expert, as an index into the composition; ``flat`` int64 [n]: its row
    ``group * per_group + rank``; ``identity``: the lanes already are in that order and every expert has
    ``per_group`` of them, so no gather or scatter is needed (batch 1, top-k).
    """

    group: object
    flat: object
    n_groups: int
    per_group: int
    identity: bool

    @classmethod
    def of(cls, groups: list[int], n_groups: int, device: str) -> "Layout":
        import torch

        rank, seen = [], [0] * n_groups
        for g in groups:
            rank.append(seen[g])
            seen[g] += 1
        per = max(seen)
        flat = [g * per + r for g, r in zip(groups, rank)]
        identity = flat == list(range(n_groups * per))
        return cls(torch.tensor(groups, device=device), torch.tensor(flat, device=device), n_groups, per, identity)

    def to_pad(self, t):
        """[n, T, D] in lane order -> [experts, per_group * T, D] (empty places are zeros)."""
        n, length, width = t.shape
        if self.identity:
            return t.reshape(self.n_groups, self.per_group * length, width)
        out = t.new_zeros((self.n_groups * self.per_group, length, width))
        out[self.flat] = t
        return out.view(self.n_groups, self.per_group * length, width)

    def from_pad(self, t, length: int):
        """[experts, per_group * T, D] -> [n, T, D] in lane order."""
        rows = t.reshape(self.n_groups * self.per_group, length, t.shape[-1])
        return rows if self.identity else rows[self.flat]


def hidden_states(stack: Stack, weights: dict, layout: Layout, tokens, positions, attend):
    """The final-norm hidden states [experts, per_group * T, hidden] of lanes reading ``tokens`` int64 [n, T] at
    ``positions`` int64 [n, T]; ``attend(layer, q, k, v)`` ([n, heads, T, head_dim] each; k, v with kv_heads)
    returns the attention output [n, heads, T, head_dim] and keeps the lanes' KV caches."""
    import torch
    import torch.nn.functional as F

    s, n, length = stack.shape, tokens.shape[0], tokens.shape[1]
    x = layout.to_pad(weights["emb"][layout.group[:, None], tokens])
    cos, sin = stack.cos[positions][:, None], stack.sin[positions][:, None]  # [n, 1, T, head_dim]
    q_dim, kv_dim = s.heads * s.head_dim, s.kv_heads * s.head_dim
    for li, layer in enumerate(weights["layers"]):
        h = _rms(x, layer["ln1"][:, None, :], s.eps)
        qkv = layout.from_pad(torch.bmm(h, layer["qkv"].mT), length)
        q, k, v = qkv.split((q_dim, kv_dim, kv_dim), dim=-1)
        q = q.view(n, length, s.heads, s.head_dim).transpose(1, 2)
        k = k.view(n, length, s.kv_heads, s.head_dim).transpose(1, 2)
        v = v.view(n, length, s.kv_heads, s.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        a = attend(li, q, k, v).transpose(1, 2).reshape(n, length, q_dim)
        x = x + torch.bmm(layout.to_pad(a), layer["o"].mT)
        h = _rms(x, layer["ln2"][:, None, :], s.eps)
        gate, up = torch.bmm(h, layer["gu"].mT).chunk(2, dim=-1)
        x = x + torch.bmm(F.silu(gate) * up, layer["down"].mT)
    return _rms(x, weights["norm"][:, None, :], s.eps)


def head(weights: dict, x):
    """Logits [experts, rows, vocab] of hidden states [experts, rows, hidden] (tied or own output matrix)."""
    import torch

    return torch.bmm(x, weights.get("head", weights["emb"]).mT)


def causal_attention(q, k, v):
    """Attention of a prefill over its own keys (lanes right-padded: a valid query never sees padding)."""
    import torch.nn.functional as F

    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


def _lane_logprobs(stack: Stack, weights: dict, groups: list[int], seqs: list[list[int]]):
    """(next-token log-probabilities float32 [n, length, vocab], tokens int64 [n, length]) of each lane's
    sequence under its expert, one forward for all lanes (each at most max_positions tokens, no cache kept)."""
    import torch

    layout = Layout.of(groups, len(weights["slots"]), stack.device)
    length = max(len(s) for s in seqs)
    tokens = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = torch.tensor(s)
    tokens = tokens.to(stack.device)
    positions = torch.arange(length, device=stack.device).expand(len(seqs), length)
    x = hidden_states(stack, weights, layout, tokens, positions, lambda li, q, k, v: causal_attention(q, k, v))
    return torch.log_softmax(layout.from_pad(head(weights, x), length).float(), dim=-1), tokens


def score_lanes(stack: Stack, weights: dict, groups: list[int], seqs: list[list[int]]) -> list[np.ndarray]:
    """log p(seq[t] | seq[:t]) (float64 [len - 1]) of each lane's sequence under its expert, one forward."""
    logp, tokens = _lane_logprobs(stack, weights, groups, seqs)
    out = []
    for i, s in enumerate(seqs):
        target = tokens[i, 1:len(s)]
        out.append(logp[i, :len(s) - 1].gather(1, target[:, None])[:, 0].double().cpu().numpy())
    return out


def tail_lanes(stack: Stack, weights: dict, groups: list[int], seqs: list[list[int]], tails: list[int]) -> list:
    """Next-token probabilities (float32 [tail, vocab]) at the positions predicting the last ``tail`` tokens of
    each lane's sequence, one forward for all lanes."""
    logp, _ = _lane_logprobs(stack, weights, groups, seqs)
    return [logp[i, len(s) - 1 - m:len(s) - 1].exp() for i, (s, m) in enumerate(zip(seqs, tails))]
