"""`Ensemble`: a thin facade over a run directory. It loads the run (manifest, centroids, tokenizer, pinned
experts), validates every call, and hands the work to the router, the decoding engine and a backend."""
from __future__ import annotations

import dataclasses
import logging
import numbers
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from cluster.config import EmbedConfig
from cluster.embed import load_embedder
from cluster.kmeans import read_clusters
from ensemble import checks
from ensemble.config import ROUTERS, EnsembleConfig, resolve_routing
from ensemble.engine import Engine
from ensemble.evidence import Evidence
from ensemble.pool import ExpertPool, PinnedExpert
from ensemble.prefix_router import PrefixRouter
from ensemble.router import prior_weights
from ensemble.routing import CentroidRouter, LockedEmbedder, RouteSpec, route_texts
from ensemble.sampling import Sampling
from ensemble.scoring import context_vectors, experts_logprobs, mix, window_contexts, window_weights
from ensemble.sequential import SequentialBackend
from ensemble.stacked import Shape, unstackable_reason
from ensemble.stacked_backend import StackedBackend
from experts.tokenizer import load_tokenizer
from ground.arrays import load_npy
from ground.device import resolve_device
from ground.errors import IncompatibleRunError
from ground.fields import finite_positive
from ground.files import read_json
from ground.rundir import RunDir

log = logging.getLogger(__name__)
BACKENDS = ("auto", "stacked", "sequential")


def read_part(run: RunDir, path: Path, read):
    """``read(path)`` for a file or directory the build writes (the tokenizer, clusters.json, the seed's config),
    or IncompatibleRunError naming it and the command that rewrites it."""
    try:
        return read(path)
    except Exception as exc:  # read_json's ValueError, OSError, and the tokenizers library's own errors
        cause = exc.__cause__ if isinstance(exc.__cause__, ValueError) else exc  # read_json's names the JSON error
        raise IncompatibleRunError(f"run {run.root}: {path.relative_to(run.root)} is damaged "
                                   f"({type(cause).__name__}): {run.repair_hint()}") from exc


@dataclass(frozen=True)
class RunView:
    """What one call sees of the run: a snapshot replaced as a whole by `Ensemble.reload`."""

    manifest: object
    config: EnsembleConfig
    centroids: np.ndarray   # float32 [n_clusters, dim]
    active: np.ndarray      # int64 cluster ids that are routed to (not skipped, not removed)
    sizes: dict             # cluster_id -> training documents (the first scoring window's prior)
    clusters: list          # clusters.json rows
    router: CentroidRouter
    top_k: int
    route_temperature: float
    evidence: Evidence


class Ensemble:
    """A sparse c-BTM ensemble over the experts of one run directory; safe to share between threads.

    Only the top-k experts chosen for a prompt run; their next-token probabilities are mixed with the routing
    weights. Experts load lazily and stay pinned at the version this object loaded until `reload()`;
    ``max_loaded_experts`` bounds how many stay in memory. ``backend``: "stacked" (experts of one Llama shape
    stacked, one batched call per step), "sequential" (one HF model call per expert) or "auto".
    ``evidence_weight``: `ensemble.evidence`'s weight instead of the run's (0: the routing weights alone).
    """

    def __init__(self, run_dir: Path | str, device: str = "auto", top_k: int | None = None,
                 route_temperature: float | None = None, max_loaded_experts: int | None = None,
                 backend: str = "auto", router: str | None = None, *, unfinished: bool = False,
                 evidence_weight: float | None = None):
        if max_loaded_experts is not None and (isinstance(max_loaded_experts, bool) or not isinstance(
                max_loaded_experts, numbers.Integral) or max_loaded_experts < 1):
            raise ValueError(f"max_loaded_experts must be a whole number >= 1 or None, got {max_loaded_experts!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if router is not None and router not in ROUTERS:
            raise ValueError(f"router must be one of {', '.join(ROUTERS)} or None (the run's), got {router!r}")
        self._router_kind = router
        self._unfinished = unfinished
        self._evidence_weight = None if evidence_weight is None else Evidence(evidence_weight).weight
        self.run = RunDir(run_dir)
        self.device = resolve_device(device)
        self.max_loaded_experts = max_loaded_experts
        self._overrides = (top_k, route_temperature)
        self._reload_lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        self._pool: ExpertPool | None = None
        self._embedder = None
        self._backend_kind = backend
        self.tokenizer = read_part(self.run, self.run.tokenizer_dir, load_tokenizer) \
            if self.run.tokenizer_dir.is_dir() else None
        self.reload()

    @classmethod
    def load(cls, run_dir: Path | str, device: str = "auto", top_k: int | None = None,
             route_temperature: float | None = None, max_loaded_experts: int | None = None,
             backend: str = "auto", router: str | None = None, *, unfinished: bool = False,
             evidence_weight: float | None = None) -> "Ensemble":
        """Open a finished run directory (raises IncompatibleRunError / FileNotFoundError / ValueError saying
        what to do). ``router``: "centroid" or "prefix" instead of the run's own (its temperature then is that
        router's default unless ``route_temperature`` is given). ``unfinished``: also a run whose experts are
        all recorded but which is not assembled yet (the build's tune stage scores it before DONE).
        ``evidence_weight``: 0 mixes by the routing weights alone, as c-BTM does (default: the run's)."""
        return cls(run_dir, device, top_k, route_temperature, max_loaded_experts, backend, router,
                   unfinished=unfinished, evidence_weight=evidence_weight)

    # ------------------------------------------------------------------------------------------ loading
    def reload(self) -> list[int]:
        """Re-read the manifest and pin the experts' current files; returns the cluster ids whose expert changed.
        Calls already running finish on the experts they started with."""
        with self._reload_lock:
            view, pins = self._read_run()
            if self._pool is None:
                self._start(view, pins)
                changed = []
            else:
                changed = self._pool.swap(pins)
                if self.max_loaded_experts is None and hasattr(self.backend, "capacity"):
                    self.backend.capacity = max(self.backend.capacity, len(pins))  # `cbtm add` grew the run
            self._view = view
        if changed:
            log.info("reload: expert(s) %s changed", changed)
        return changed

    def _read_run(self) -> tuple[RunView, dict]:
        run = self.run
        manifest = run.read_manifest()
        if not self._unfinished and (not run.done_path.exists() or "assemble" not in manifest.stages):
            raise IncompatibleRunError(f"run {run.root} is not finished: complete it with `cbtm run --out {run.root}`")
        needed = (run.centroids_path, run.clusters_dir / "clusters.json", run.tokenizer_dir,
                  run.seed_dir / "config.json")
        for path in needed:
            if not path.exists():
                raise IncompatibleRunError(f"run {run.root} is incomplete ({path.relative_to(run.root)} is missing): "
                                           f"finish it with `cbtm run --out {run.root} --force cluster`")
        config = EnsembleConfig(**manifest.config.get("ensemble", {}))
        routing = manifest.routing
        if self._router_kind and self._router_kind != config.router:  # the run's temperature is the other's
            config = dataclasses.replace(config, router=self._router_kind, route_temperature=None)
            routing = {k: v for k, v in routing.items() if k != "route_temperature"}
        try:
            centroids = load_npy(run.centroids_path).astype(np.float32)
        except ValueError as exc:
            raise IncompatibleRunError(f"run {run.root}: {exc}: re-cluster it with "
                                       f"`cbtm run --out {run.root} --force cluster`") from exc
        removed = set(manifest.removed)
        active = np.array([c for c in range(len(centroids)) if c not in removed
                           and not manifest.experts.get(str(c), {}).get("skipped")], dtype=np.int64)
        if not len(active):
            raise IncompatibleRunError(f"run {run.root} has no expert to route to: train or restore one")
        missing = [int(c) for c in active if str(int(c)) not in manifest.experts]
        if missing:
            raise IncompatibleRunError(f"run {run.root} has no expert for cluster(s) {missing}: "
                                       f"train them with `cbtm retrain {run.root} --cluster N`")
        clusters = read_part(run, run.clusters_dir / "clusters.json", lambda p: read_clusters(p.parent)["clusters"])
        sizes = {c["cluster_id"]: c.get("size_train_balanced", c["size_train"]) for c in clusters}
        top_k, temperature = resolve_routing(routing, config, len(active), *self._overrides)
        if config.router == "prefix":
            router = PrefixRouter(run.router_dir, centroids, self._embed_fn(manifest), self.encode, self._decode)
        else:
            router = CentroidRouter(self._embed_fn(manifest), centroids)
        old = {c: p for c, p in (self._pool._pins.items() if self._pool else [])}
        pins = {}
        for c in active.tolist():
            entry = manifest.experts[str(c)]
            pins[c] = old[c] if c in old and old[c].version == entry.get("hash") else PinnedExpert(run.root, c, entry)
        evidence = config.evidence if self._evidence_weight is None else Evidence(self._evidence_weight,
                                                                                  config.evidence_decay)
        return RunView(manifest, config, centroids, active, sizes, clusters, router, top_k, temperature,
                       evidence), pins

    def _embed_fn(self, manifest):
        if self._embedder is None:
            cfg = dict(manifest.config.get("embed", {}), device=self.device)
            self._embedder = LockedEmbedder(lambda: load_embedder(EmbedConfig(**cfg), self.run.embeddings_dir))
        return self._embedder

    def _start(self, view: RunView, pins: dict) -> None:
        seed_config = read_part(self.run, self.run.seed_dir / "config.json", read_json)
        self.vocab_size = int(seed_config["vocab_size"])
        self.max_positions = int(seed_config.get("max_position_embeddings") or 1024)
        self._pool = ExpertPool(pins, self.device, self.max_loaded_experts, self.vocab_size)
        self.backend = self._make_backend(seed_config, len(pins))
        self.engine = Engine(self.backend, self.tokenizer, route_texts, self.max_positions, self._tokenizer_lock)

    def _make_backend(self, seed_config: dict, n_experts: int):
        from transformers import AutoConfig

        config = AutoConfig.for_model(**seed_config)
        reason = unstackable_reason(config)
        if self._backend_kind == "stacked" and reason:
            raise ValueError(f"backend='stacked' needs Llama-shaped experts; this run's seed has {reason}")
        if self._backend_kind == "sequential" or reason:
            return SequentialBackend(self._pool.model, self.device, self.tokenizer.eos_token_id, self.max_positions)
        return StackedBackend(Shape.of(config), self._pool.load_state, self._pool.version,
                              self.max_loaded_experts or n_experts, self.device)

    # ------------------------------------------------------------------------------------------ properties
    top_k = property(lambda self: self._view.top_k)
    route_temperature = property(lambda self: self._view.route_temperature)
    route_window = property(lambda self: self._view.config.route_window)
    evidence = property(lambda self: self._view.evidence)
    active = property(lambda self: self._view.active)
    n_experts = property(lambda self: len(self._view.active))
    n_clusters = property(lambda self: len(self._view.centroids))
    manifest = property(lambda self: self._view.manifest)

    @property
    def experts(self) -> list[dict]:
        """One row per cluster: cluster_id, keywords, size (training documents), path, loaded, skipped, removed."""
        view = self._view
        loaded = self._pool.loaded() | (self.backend.resident() if isinstance(self.backend, StackedBackend) else set())
        entries = view.manifest.experts
        return [{"cluster_id": c["cluster_id"], "keywords": c["keywords"], "size": c["size_train"],
                 "path": str(self.run.root / entries.get(str(c["cluster_id"]), {}).get("path", "")),
                 "loaded": c["cluster_id"] in loaded,
                 "skipped": bool(entries.get(str(c["cluster_id"]), {}).get("skipped")),
                 "removed": c["cluster_id"] in view.manifest.removed} for c in view.clusters]

    def expert_model(self, cluster_id: int):
        """The Hugging Face model of expert ``cluster_id`` (the pinned version, loaded lazily)."""
        return self._pool.model(int(cluster_id))

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embed texts with the run's embedder: float32 [n, dim], unit rows (whatever the router: the prefix
        router's own features are a sparse matrix of more than the embedding)."""
        return np.asarray(self._embed_fn(self._view.manifest)(list(texts)))

    def _decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text`` (by default without the tokenizer's special tokens)."""
        with self._tokenizer_lock:  # fast tokenizers are not safe to call from several threads at once
            return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    # ------------------------------------------------------------------------------------------ routing
    def route_spec(self, top_k=None, route_temperature=None, experts=None, exclude_experts=None,
                   view: RunView | None = None) -> RouteSpec:
        """The routing of a call (checked): which experts may serve, top_k among them, at which temperature."""
        view = view or self._view
        cols = checks.columns(view.active, view.manifest.removed, len(view.centroids), experts, exclude_experts)
        # A call's argument wins; else the run's value (resolved at load), lowered to the experts allowed here.
        top_k = min(view.top_k, len(cols)) if top_k is None else checks.whole(top_k, "top_k", 1, len(cols))
        temperature = view.route_temperature if route_temperature is None else finite_positive(
            route_temperature, "route_temperature")
        return RouteSpec(view.router, cols, int(top_k), float(temperature), view.evidence)

    def route(self, texts, top_k: int | None = None, route_temperature: float | None = None,
              experts=None, exclude_experts=None):
        """[(cluster_id, weight), ...] best first (weights sum to 1) for one text, or a list of those.
        ``top_k`` defaults to the run's, as for generate and score."""
        batch, single = checks.texts(texts, "text")
        spec = self.route_spec(top_k, route_temperature, experts, exclude_experts)
        ids, weights = spec.weights(spec.router.vectors(batch))
        out = [[(int(c), float(w)) for c, w in zip(row_ids, row_w)] for row_ids, row_w in zip(ids, weights)]
        return out[0] if single else out

    # ------------------------------------------------------------------------------------------ generation
    def _generation(self, prompts, max_new_tokens, top_k, route_temperature, experts, exclude_experts,
                    do_sample, temperature, top_p, seed, stop, reroute_every):
        batch, single = checks.texts(prompts)
        checks.whole(max_new_tokens, "max_new_tokens", 0)
        if reroute_every is not None:
            checks.whole(reroute_every, "reroute_every", 1)
        sampling = Sampling(do_sample, temperature, top_p, seed, () if stop is None else stop)
        spec = self.route_spec(top_k, route_temperature, experts, exclude_experts)
        return batch, single, sampling, spec

    def generate(self, prompts, max_new_tokens: int = 64, top_k: int | None = None, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None, stop=None,
                 reroute_every: int | None = None, route_temperature: float | None = None, experts=None,
                 exclude_experts=None):
        """Continue each prompt with the mixture of its top-k experts; returns the continuation text(s).

        Prompts of a batch decode together (each expert runs once per step on its prompts). A prompt and its
        ``max_new_tokens`` must fit the context (ValueError saying the limit). ``reroute_every=N`` re-embeds
        prompt + generated text every N tokens and updates the weights. ``experts`` / ``exclude_experts``:
        only these cluster ids may serve / these may not (a data owner opting out).
        """
        batch, single, sampling, spec = self._generation(prompts, max_new_tokens, top_k, route_temperature, experts,
                                                         exclude_experts, do_sample, temperature, top_p, seed, stop,
                                                         reroute_every)
        decoding = self.engine.generate(batch, max_new_tokens, sampling, spec, reroute_every)
        for _ in decoding:
            pass
        texts = [self.engine.text(row) for row in decoding.rows]
        return texts[0] if single else texts

    def stream(self, prompt: str, max_new_tokens: int = 64, top_k: int | None = None, do_sample: bool = False,
               temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None, stop=None,
               reroute_every: int | None = None, route_temperature: float | None = None, experts=None,
               exclude_experts=None) -> Iterator[str]:
        """Yield the continuation of one prompt as text pieces, as they are produced (joined: `generate`'s text)."""
        if not isinstance(prompt, str):
            raise ValueError(f"stream takes one prompt (a string), got {type(prompt).__name__}")
        batch, _, sampling, spec = self._generation(prompt, max_new_tokens, top_k, route_temperature, experts,
                                                    exclude_experts, do_sample, temperature, top_p, seed, stop,
                                                    reroute_every)
        decoding = self.engine.generate(batch, max_new_tokens, sampling, spec, reroute_every)
        row, sent = decoding.rows[0], ""
        for _ in decoding:
            text = self.engine.text(row)
            if text.endswith("\ufffd") and row.finish is None:
                continue  # half of a multi-byte character: wait for the rest
            if len(text) > len(sent):
                yield text[len(sent):]
                sent = text
        final = self.engine.text(row)
        if len(final) > len(sent):
            yield final[len(sent):]

    # ------------------------------------------------------------------------------------------ scoring
    def score(self, texts, top_k: int | None = None, route_temperature: float | None = None, experts=None,
              exclude_experts=None) -> list[np.ndarray]:
        """Per-token log-probabilities (float64 [n_tokens] per text) under the routed mixture (`ensemble.scoring`)."""
        batch, _ = checks.texts(texts, "text")
        spec = self.route_spec(top_k, route_temperature, experts, exclude_experts)
        plan = self.scoring(batch, spec.columns)
        weights = plan.weights(spec.top_k, spec.route_temperature)
        return mix(weights, plan.logprobs(weights), spec.evidence)

    def perplexity(self, texts, top_k: int | None = None, route_temperature: float | None = None, experts=None,
                   exclude_experts=None) -> float:
        """Token-level perplexity of the texts under the routed top-k mixture."""
        logps = np.concatenate(self.score(texts, top_k, route_temperature, experts, exclude_experts))
        return float(np.exp(-logps.mean()))

    def scoring(self, texts: list[str], columns=None, vectors: np.ndarray | None = None,
                on_progress=None) -> "ScoringPlan":
        """The routing of every scoring window of ``texts`` computed once, for several top_k / temperatures
        (`cbtm eval`, `cbtm tune-temperature`); ``vectors``: the window embeddings of another plan over the same
        texts and embedder (a run derived from this one), reused; ``on_progress(done, total)``: called as the
        windows' contexts are embedded (a progress bar's update)."""
        return self.scoring_ids([self.encode(t) for t in texts], columns, vectors, on_progress)

    def scoring_ids(self, encoded: list[list[int]], columns=None, vectors: np.ndarray | None = None,
                    on_progress=None) -> "ScoringPlan":
        """`scoring` of texts given as token ids (no leading end-of-text token): the server's echoed prompts."""
        view = self._view
        cols = np.asarray(columns if columns is not None else view.active, dtype=np.int64)
        contexts, owners = window_contexts(encoded, view.config.route_window,
                                           lambda ids: self.engine.decode(ids, skip_special_tokens=False),
                                           getattr(view.router, "early_starts", ()))
        if vectors is None or vectors.shape[0] != len(contexts) or view.router.kind != "centroid":
            vectors = context_vectors(view.router, contexts, on_progress) if contexts else None
        return ScoringPlan(self, view, encoded, owners, vectors, cols)

    def prior(self, columns) -> tuple[np.ndarray, np.ndarray]:
        """Weights before any context exists: every listed expert, by its cluster's training size."""
        cols = np.asarray(columns, dtype=np.int64)
        ids, weights = prior_weights(np.array([self._view.sizes[int(c)] for c in cols]), len(cols))
        return cols[ids[0]], weights[0]


class ScoringPlan:
    """Window routing of tokenised texts (`Ensemble.scoring`): weights for any top_k and temperature, and the
    experts' log-probabilities under them."""

    def __init__(self, ens: Ensemble, view: RunView, encoded, owners, vectors, columns):
        self.ens, self.view, self.encoded, self.owners, self.vectors, self.columns = (
            ens, view, encoded, owners, vectors, columns)
        self.logits = None if vectors is None else view.router.logits(vectors, columns)

    def weights(self, top_k: int, route_temperature: float) -> list[np.ndarray]:
        """Per text, dense weights float64 [n_tokens, n_clusters]: every listed expert over the first window,
        top_k from the second on (`ensemble.scoring`)."""
        logits = None if self.logits is None else self.logits / route_temperature
        return window_weights([len(ids) for ids in self.encoded], len(self.view.centroids), self.owners, logits,
                              top_k, self.columns, self.ens.prior(self.columns), self.view.config.route_window)

    def logprobs(self, weights: list[np.ndarray]) -> list[dict[int, np.ndarray]]:
        return experts_logprobs(self.ens.backend, self.ens.tokenizer.eos_token_id, self.encoded, weights)
