"""Prompts as completions clients send them (text or token ids), and ``echo``: the prompt's own tokens scored.

An echoed prompt's tokens are scored as `Ensemble.score` scores text (the c-BTM protocol of `cbtm eval`: each
token's experts and weights come from the context before it), so ``echo`` with ``logprobs`` turns the server into
a scorer: lm-evaluation-harness's ``local-completions`` model sends token ids with ``echo``, ``logprobs=1`` and
``max_tokens=1`` and reads the prompt's log-probabilities back.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ensemble.scoring import mix_probs
from ensemble.server.protocol import ApiError


@dataclass
class Prompts:
    """The prompts of one request: ``texts`` (what routing embeds), ``encoded`` (token ids, no leading
    end-of-text token: the server puts one before every prompt) and ``lead`` (whether the client sent that
    token itself; it is echoed back, unscored, as OpenAI leaves a prompt's first token unscored)."""

    texts: list[str]
    encoded: list[list[int]]
    lead: list[bool]

    @property
    def n_tokens(self) -> int:
        return sum(len(ids) + lead for ids, lead in zip(self.encoded, self.lead))


@dataclass(frozen=True)
class PromptLimit:
    """The longest prompt a server takes: ``tokens``, and ``chars``, a length in characters beyond which a text
    certainly has more tokens (twice the tokens times the longest token's characters). A longer text is refused
    before it is tokenized: tokenizing megabytes takes seconds, in the event loop every stream waits on."""

    tokens: int
    chars: int

    @classmethod
    def of(cls, ens, tokens: int) -> "PromptLimit":
        longest = max(len(ens.engine.decode([i])) for i in range(len(ens.tokenizer)))
        return cls(tokens, 2 * tokens * max(longest, 1))


def _too_long(size: str) -> ApiError:
    return ApiError(400, f"the prompt has {size} (`cbtm serve --max-prompt-tokens`, at most the context)", "prompt",
                    "prompt_too_long")


def read_prompts(ens, prompt, limit: PromptLimit) -> Prompts:
    """A completions ``prompt`` (a string, strings, token ids, or lists of token ids) as `Prompts`; 400 when
    one is empty, holds a token id outside the vocabulary, or has more tokens than ``limit`` (a text surely
    too long by its length is refused before it is tokenized)."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt or any(not isinstance(p, str) or not p.strip() for p in prompt if not isinstance(p, list)):
        raise ApiError(400, "prompt is empty: send at least one non-space character", "prompt")
    if all(isinstance(p, str) for p in prompt):
        longest = max(len(p) for p in prompt)
        if longest > limit.chars:
            raise _too_long(f"{longest:,} characters, far more than the {limit.tokens} tokens this server takes")
        prompts = Prompts(list(prompt), [ens.encode(p) for p in prompt], [False] * len(prompt))
    else:
        prompts = _token_prompts(ens, prompt, limit)
    longest = max(len(ids) for ids in prompts.encoded)
    if longest > limit.tokens:
        raise _too_long(f"{longest} tokens; this server takes at most {limit.tokens}")
    return prompts


def _token_prompts(ens, prompt: list[list[int]], limit: PromptLimit) -> Prompts:
    """`Prompts` of token-id lists: checked against the vocabulary and ``limit`` before they are decoded (the
    text is what routing embeds)."""
    eos, vocab = ens.tokenizer.eos_token_id, len(ens.tokenizer)
    texts, encoded, lead = [], [], []
    for ids in prompt:
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"prompt: token id {bad} is outside this model's vocabulary (0..{vocab - 1})",
                           "prompt")
        starts = bool(ids) and ids[0] == eos
        ids = list(ids[1:] if starts else ids)
        if len(ids) > limit.tokens:
            raise _too_long(f"{len(ids)} tokens; this server takes at most {limit.tokens}")
        text = ens.engine.decode(ids)
        if not text.strip():
            raise ApiError(400, "prompt is empty: send token ids of at least one non-space character", "prompt")
        texts.append(text)
        encoded.append(ids)
        lead.append(starts)
    return Prompts(texts, encoded, lead)


def prompt_logprobs(ens, encoded: list[list[int]], spec, top_n: int) -> list[tuple[list[float], list | None]]:
    """Per prompt: the log-probability of each token (float, one per id of ``encoded[i]``) under the mixture
    of `Ensemble.score`, and with ``top_n`` >= 1 the ``top_n`` most likely tokens at each position [(id, logprob)]
    (from the same float32 mixture, so a token that is the argmax has exactly the top logprob). One prompt at a
    time: its experts' next-token probabilities (float32 [n_tokens, vocab] each) are all held at once."""
    import torch

    plan = ens.scoring_ids(encoded, spec.columns)
    eos = ens.tokenizer.eos_token_id
    out = []
    for ids, w in zip(encoded, plan.weights(spec.top_k, spec.route_temperature)):
        experts = [int(e) for e in np.flatnonzero(w.any(axis=0))]
        probs = ens.backend.tail_probs([(e, [eos, *ids], len(ids)) for e in experts])
        mixed = mix_probs(probs, ids, w[:, experts], spec.evidence)  # weighted as `Ensemble.score` weighs them
        logp = torch.log(mixed.float().clamp_min(1e-30))
        chosen = logp.gather(1, torch.tensor(ids, device=logp.device)[:, None])[:, 0].tolist()
        top = None
        if top_n > 0:
            values, best = torch.topk(logp, top_n, dim=-1)
            top = [list(zip(b.tolist(), v.tolist())) for b, v in zip(best, values)]
        out.append((chosen, top))
    return out


def echo_blocks(ens, prompts: Prompts, scored, top_n: int | None) -> list[dict | None]:
    """OpenAI ``logprobs`` blocks of the echoed prompts (None per prompt when logprobs were not asked for)."""
    if top_n is None:
        return [None] * len(prompts.texts)
    decode = ens.engine.decode
    blocks = []
    for ids, lead, (chosen, top) in zip(prompts.encoded, prompts.lead, scored):
        tokens = [decode([t]) for t in ids]
        tops = [{decode([t]): lp for t, lp in row} for row in top] if top is not None else None
        if lead:
            tokens, chosen = [decode([ens.tokenizer.eos_token_id])] + tokens, [None] + chosen
            tops = [None] + tops if tops is not None else None
        offsets = np.concatenate([[0], np.cumsum([len(t) for t in tokens])[:-1]]).astype(int).tolist()
        blocks.append({"tokens": tokens, "token_logprobs": chosen, "text_offset": offsets,
                       "top_logprobs": tops if top_n else None})
    return blocks


def join_blocks(head: dict | None, tail: dict | None, shift: int) -> dict | None:
    """The echoed prompt's block followed by the completion's (whose offsets start ``shift`` characters on)."""
    if head is None or tail is None:
        return head or tail
    top = None if head["top_logprobs"] is None else head["top_logprobs"] + (tail["top_logprobs"] or [])
    return {"tokens": head["tokens"] + tail["tokens"],
            "token_logprobs": head["token_logprobs"] + tail["token_logprobs"],
            "text_offset": head["text_offset"] + [o + shift for o in tail["text_offset"]], "top_logprobs": top}
