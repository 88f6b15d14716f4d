"""`Ensemble`: load a run directory, route prompts to their top-k experts, generate and score."""
from __future__ import annotations

import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

import numpy as np

from ensemble.config import EnsembleConfig
from ensemble.device import resolve_device
from ensemble.router import prior_weights, route_weights
from ensemble.rundir import IncompatibleRunError, RunDir

log = logging.getLogger(__name__)


class Ensemble:
    """A sparse c-BTM ensemble over the experts of one run directory.

    Only the top-k experts chosen for a prompt are loaded and run; their next-token probabilities are
    mixed with the routing weights. Experts load lazily; ``max_loaded_experts`` bounds how many stay in
    memory (least recently used are released). Use `Ensemble.load(run_dir)`.
    """

    def __init__(self, run_dir: Path | str, device: str = "auto", top_k: int | None = None,
                 temperature: float | None = None, max_loaded_experts: int | None = None):
        self.run = RunDir(run_dir)
        self.device = resolve_device(device)
        self.max_loaded_experts = max_loaded_experts
        self._top_k_override, self._temperature_override = top_k, temperature
        self._models: OrderedDict[int, object] = OrderedDict()
        self._embedder = None
        self.reload()

    @classmethod
    def load(cls, run_dir: Path | str, device: str = "auto", top_k: int | None = None,
             temperature: float | None = None, max_loaded_experts: int | None = None) -> "Ensemble":
        """Open a finished run directory (raises IncompatibleRunError / FileNotFoundError with what to do)."""
        return cls(run_dir, device, top_k, temperature, max_loaded_experts)

    # ------------------------------------------------------------------------------------------ loading
    def reload(self) -> None:
        """Re-read the manifest; experts whose files changed (retrained) are reloaded on next use."""
        manifest = self.run.read_manifest()
        if not self.run.done_path.exists() or "assemble" not in manifest.stages:
            raise IncompatibleRunError(f"run {self.run.root} is not finished: complete it with "
                                       f"`cbtm run --out {self.run.root}`")
        self.manifest = manifest
        ens_cfg = EnsembleConfig(**manifest.config.get("ensemble", {}))
        self.temperature = float(self._temperature_override or manifest.temperature or ens_cfg.temperature)
        self.top_k = int(self._top_k_override or manifest.top_k or ens_cfg.top_k)
        self.route_window = ens_cfg.route_window
        self.centroids = np.load(self.run.clusters_dir / "centroids.npy")
        self.n_clusters = len(self.centroids)
        # Clusters whose expert was skipped (too little data to train) are never routed to.
        self.active = np.array([c for c in range(self.n_clusters)
                                if not manifest.experts.get(str(c), {}).get("skipped")], dtype=np.int64)
        self.n_experts = len(self.active)
        self._check_top_k(min(self.top_k, self.n_experts))
        self.top_k = min(self.top_k, self.n_experts)
        from cluster.kmeans import read_clusters

        self.clusters = read_clusters(self.run.clusters_dir)["clusters"]
        self._paths = {int(cid): self.run.root / entry["path"] for cid, entry in manifest.experts.items()}
        self._hashes = {int(cid): entry.get("hash") for cid, entry in manifest.experts.items()}
        missing = [int(c) for c in self.active if c not in self._paths]
        if missing:
            raise IncompatibleRunError(f"run {self.run.root} has no expert for cluster(s) {missing}: "
                                       f"train them with `cbtm retrain {self.run.root} --cluster N`")
        stale = [c for c, m in self._models.items() if getattr(m, "_cbtm_hash", None) != self._hashes[c]]
        for cid in stale:
            del self._models[cid]
        from experts.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(self.run.tokenizer_dir)
        seed_config = json.loads((self.run.seed_dir / "config.json").read_text())
        self.vocab_size = int(seed_config["vocab_size"])
        self.max_positions = int(seed_config.get("max_position_embeddings") or 1024)

    @property
    def experts(self) -> list[dict]:
        """One row per expert: cluster_id, keywords, size (training documents), path, loaded."""
        return [{"cluster_id": c["cluster_id"], "keywords": c["keywords"], "size": c["size_train"],
                 "path": str(self._paths[c["cluster_id"]]), "loaded": c["cluster_id"] in self._models,
                 "skipped": c["cluster_id"] not in self.active}
                for c in self.clusters]

    def expert_model(self, cluster_id: int):
        """The loaded expert model for ``cluster_id`` (loaded lazily, LRU-bounded)."""
        if cluster_id in self._models:
            self._models.move_to_end(cluster_id)
            return self._models[cluster_id]
        path = self._paths[cluster_id]
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"expert {cluster_id} files are missing at {path}: "
                                    f"retrain it with `cbtm retrain {self.run.root} --cluster {cluster_id}`")
        from experts.seed import load_causal_lm

        model = load_causal_lm(path).to(self.device).eval()
        if model.config.vocab_size != self.vocab_size:
            raise IncompatibleRunError(f"expert {cluster_id} has a vocabulary of {model.config.vocab_size}, the seed "
                                       f"{self.vocab_size}: every expert must branch from the run's seed")
        model._cbtm_hash = self._hashes[cluster_id]
        self._models[cluster_id] = model
        while self.max_loaded_experts and len(self._models) > self.max_loaded_experts:
            self._models.popitem(last=False)
        return model

    # ------------------------------------------------------------------------------------------ routing
    def _check_top_k(self, top_k: int) -> None:
        if not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= self.n_experts:
            raise ValueError(f"top_k must be between 1 and the number of experts ({self.n_experts}), got {top_k}")

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embed texts with the run's embedder: float32 [n, dim], unit rows."""
        if self._embedder is None:
            from cluster.config import EmbedConfig
            from cluster.embed import load_embedder

            cfg = dict(self.manifest.config.get("embed", {}), device=self.device)
            self._embedder = load_embedder(EmbedConfig(**cfg), self.run.embeddings_dir)
        return self._embedder.encode(texts)

    def _route_arrays(self, texts: list[str], top_k: int) -> tuple[np.ndarray, np.ndarray]:
        from cluster.kmeans import squared_distances

        ids, weights = route_weights(squared_distances(self.embed(texts), self.centroids[self.active]),
                                     self.temperature, top_k)
        return self.active[ids], weights

    def route(self, texts: str | list[str], top_k: int | None = None):
        """[(cluster_id, weight), ...] best first (weights sum to 1) for one text, or a list of those."""
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        _check_texts(batch)
        top_k = self.n_experts if top_k is None else top_k
        self._check_top_k(top_k)
        ids, weights = self._route_arrays(batch, top_k)
        out = [[(int(c), float(w)) for c, w in zip(row_ids, row_w)] for row_ids, row_w in zip(ids, weights)]
        return out[0] if single else out

    # ------------------------------------------------------------------------------------------ generation
    def generate(self, prompts: str | list[str], max_new_tokens: int = 64, top_k: int | None = None,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                 stop: str | list[str] | None = None, reroute_every: int | None = None) -> str | list[str]:
        """Continue each prompt with the mixture of its top-k experts; returns the continuation text(s).

        Prompts in a batch are grouped per expert (each expert runs once per step on its prompts).
        ``reroute_every=N`` re-embeds prompt + generated text every N tokens and updates the weights;
        experts that enter get their cache filled from the full context.
        """
        from ensemble.generate import cut_at_stop, decode_batch

        single = isinstance(prompts, str)
        batch = [prompts] if single else list(prompts)
        args = self._generation_args(batch, max_new_tokens, top_k, do_sample, temperature, top_p, stop, reroute_every)
        produced: list[list[int]] = [[] for _ in batch]
        for step in decode_batch(self, batch, seed=seed, **args):
            for row, token in enumerate(step):
                if token is not None:
                    produced[row].append(token)
        outs = [cut_at_stop(self.tokenizer.decode(p, skip_special_tokens=True), args["stops"]) for p in produced]
        return outs[0] if single else outs

    def stream(self, prompt: str, max_new_tokens: int = 64, top_k: int | None = None, do_sample: bool = False,
               temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
               stop: str | list[str] | None = None, reroute_every: int | None = None) -> Iterator[str]:
        """Yield the continuation of one prompt as text pieces, as they are produced."""
        from ensemble.generate import cut_at_stop, decode_batch

        args = self._generation_args([prompt], max_new_tokens, top_k, do_sample, temperature, top_p, stop,
                                     reroute_every)
        produced: list[int] = []
        sent = ""
        for step in decode_batch(self, [prompt], seed=seed, **args):
            if step[0] is None:
                break
            produced.append(step[0])
            text = cut_at_stop(self.tokenizer.decode(produced, skip_special_tokens=True), args["stops"])
            if text.endswith("\ufffd"):
                continue  # half of a multi-byte character: wait for the rest
            if len(text) > len(sent):
                yield text[len(sent):]
                sent = text
        final = cut_at_stop(self.tokenizer.decode(produced, skip_special_tokens=True), args["stops"])
        if len(final) > len(sent):
            yield final[len(sent):]

    def _generation_args(self, batch: list[str], max_new_tokens: int, top_k: int | None, do_sample: bool,
                         temperature: float, top_p: float, stop, reroute_every: int | None) -> dict:
        _check_texts(batch)
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens}")
        top_k = self.top_k if top_k is None else top_k
        self._check_top_k(top_k)
        if do_sample and (temperature <= 0 or not 0 < top_p <= 1):
            raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        if reroute_every is not None and reroute_every < 1:
            raise ValueError(f"reroute_every must be >= 1 (tokens) or None, got {reroute_every}")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        return dict(top_k=int(top_k), max_new_tokens=int(max_new_tokens), do_sample=do_sample,
                    temperature=temperature, top_p=top_p, stops=stops, reroute_every=reroute_every)

    # ------------------------------------------------------------------------------------------ scoring
    def score(self, texts: str | list[str], top_k: int | None = None) -> list[np.ndarray]:
        """Per-token log-probabilities (float64 [n_tokens] per text) under the routed mixture."""
        from ensemble.scoring import score_texts

        batch = [texts] if isinstance(texts, str) else list(texts)
        _check_texts(batch)
        top_k = self.top_k if top_k is None else top_k
        self._check_top_k(top_k)
        return score_texts(self, batch, top_k)

    def perplexity(self, texts: str | list[str], top_k: int | None = None) -> float:
        """Token-level perplexity of the texts under the routed top-k mixture."""
        logps = np.concatenate(self.score(texts, top_k))
        return float(np.exp(-logps.mean()))

    def prior(self, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        """Routing weights used before any context exists: the clusters' training sizes."""
        sizes = {c["cluster_id"]: c.get("size_train_balanced", c["size_train"]) for c in self.clusters}
        ids, weights = prior_weights(np.array([sizes[int(c)] for c in self.active]), top_k)
        return self.active[ids], weights


def _check_texts(texts: list[str]) -> None:
    if not texts:
        raise ValueError("no text given: pass a non-empty string or list of strings")
    for text in texts:
        if not isinstance(text, str) or not text.strip():
            raise ValueError("empty prompt: every text must contain at least one non-space character")
