"""The run directory: the contract between stages. `RunDir` owns every path; `Manifest` is manifest.json.

Layout (relative to the run directory)::

    manifest.json              format "cbtm-run", schema_version, config, routing, stages, experts, versions
    config.toml                the pipeline config used
    corpus/docs.parquet        id, text, split ("train"/"heldout"), any extra corpus fields; ingest.json beside it
    embeddings/                shard-00000.npy (float16, [n, d]) + shard-00000.ids.json, meta.json, embedder.json,
                               tfidf/ (the fitted tf-idf part of a tfidf or hybrid embedder)
    choose_k/                  choose_k.json, choose_k.png
    clusters/                  centroids.npy (float32, [k, d]), assignments.parquet, clusters.json
    router/                    the prefix router (ensemble.router = "prefix")
    tokenizer/                 the shared tokenizer (save_pretrained)
    seed/                      the seed model every expert branches from; pretrained/ after a seed phase
    experts/<cluster_id>/      one expert (save_pretrained safetensors + tokenizer + metrics.jsonl + expert.json)
    checkpoints/<cluster_id>/  resumable checkpoints while an expert trains; checkpoints/seed/ for the seed phase
    eval/                      results.json, temperature.json, harness.json
    baselines/<kind>/          complete runs derived from this one (dense, random)
    report.md, plots/*.png     what a person reads
    .cache/tokens/             the tokenized corpus (safe to delete)
    .lock                      held by the cbtm process writing the run
    DONE                       written last, when every stage is complete

Every artifact is written to a temporary sibling and renamed into place, so a killed run never leaves a
half-written artifact behind; the manifest is only updated after the artifact it describes is in place.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Iterator

from ground.errors import IncompatibleRunError, UserInputError
from ground.files import atomic_write_text, hash_json, read_json

FORMAT = "cbtm-run"
SCHEMA_VERSION = 2
STAGES = ("ingest", "embed", "cluster", "train", "assemble")
# Settings that change where, how fast or how safely work runs, never what it computes: no stage input hash
# and no training-checkpoint fingerprint includes them.
NOT_HASHED = frozenset({"device", "retries", "checkpoint_every", "eval_every", "compile"})
# Settings added after runs existed, with the value that computes what those runs computed: hashed only when set
# to something else, so that a run of an older cbtm (and its checkpoints) stays current.
HASHED_WHEN_CHANGED = {"branch_lr_ratio": 1.0}
ROUTING_KEYS = ("route_temperature", "top_k")


def hashed_settings(section) -> dict:
    """A config dataclass as its stage hashes it: every field but the `NOT_HASHED` ones (and the
    `HASHED_WHEN_CHANGED` ones at their old value)."""
    return {k: v for k, v in dataclasses.asdict(section).items()
            if k not in NOT_HASHED and HASHED_WHEN_CHANGED.get(k, object()) != v}


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour defines a run."""
    out = {}
    for name in ("cbtm", "torch", "transformers", "sentence-transformers", "scikit-learn", "numpy",
                 "tokenizers", "datasets", "prefect"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


@dataclass
class Manifest:
    """In-memory view of ``manifest.json``.

    ``stages[name] = {"inputs": sha256, "outputs": sha256, "finished_at": iso time}``;
    ``experts[str(cluster_id)] = {"path": "experts/<i>", "hash": sha256, "files": {name: {"size", "sha256"}},
    "val_loss": float | None, "skipped": bool, ...}`` (either record with ``"forced": true``: to be redone by
    the `cbtm run --force` in progress); ``routing[key] = {"value": ..., "source": "config" |
    "auto" | "tuned"}`` for key in route_temperature, top_k; ``removed``: cluster ids no longer routed to; ``jobs``:
    commands in progress that a re-run resumes (``{"retrain": {"clusters", "from_current", "done"}}``,
    ``{"run": {"force": [stage, ...]}}``, ``{"add": ...}``);
    ``additions``: what each `cbtm add` grew the run with (corpus, documents, joined and new clusters).
    """

    config: dict = field(default_factory=dict)
    stages: dict = field(default_factory=dict)
    experts: dict = field(default_factory=dict)
    embedder: str | None = None
    routing: dict = field(default_factory=dict)
    removed: list = field(default_factory=list)
    jobs: dict = field(default_factory=dict)
    additions: list = field(default_factory=list)
    n_clusters: int | None = None
    versions: dict = field(default_factory=library_versions)
    created_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def to_json(self) -> dict:
        return {"format": FORMAT, "schema_version": SCHEMA_VERSION, "created_at": self.created_at,
                "config": self.config, "embedder": self.embedder, "routing": self.routing,
                "removed": self.removed, "jobs": self.jobs, "additions": self.additions,
                "n_clusters": self.n_clusters, "stages": self.stages,
                "experts": self.experts, "versions": self.versions}

    @classmethod
    def from_json(cls, data: dict, where: Path) -> "Manifest":
        if data.get("format") != FORMAT:
            raise IncompatibleRunError(f"{where} is not a cbtm run manifest (format={data.get('format')!r})")
        version = data.get("schema_version")
        if version == 1:
            data = migrate_v1(data, Path(where).parent)
        elif version != SCHEMA_VERSION:
            raise IncompatibleRunError(
                f"{where} has schema version {version}, this cbtm reads versions 1 and {SCHEMA_VERSION}: rebuild "
                "the run with this version (cbtm run --out NEW_DIR)")
        fill_added_settings(data.get("config"))
        keys = ("config", "stages", "experts", "embedder", "routing", "removed", "jobs", "additions", "n_clusters",
                "versions", "created_at")
        return cls(**{k: data[k] for k in keys if k in data})

    def routing_value(self, key: str):
        """The recorded value of routing setting ``key`` (None before the assemble stage)."""
        return (self.routing.get(key) or {}).get("value")

    def routed_experts(self) -> list[int]:
        """Cluster ids of the recorded experts that are routed to: neither skipped (no files) nor removed."""
        return sorted(int(c) for c, e in self.experts.items() if not e.get("skipped") and int(c) not in self.removed)

    def scored_state(self) -> str:
        """Hash of what an evaluation of this run scores: the routed experts' files, the clusters, the router and
        the routing settings. Evaluation results record it, so that a report can tell figures of an earlier
        state of the run (rebuilt, retrained, grown, an expert removed, another temperature) from current ones."""
        ensemble = {k: v for k, v in (self.config.get("ensemble") or {}).items()
                    if k not in ("route_temperature", "top_k", "tune_docs")}  # the first two: as resolved below
        return hash_json({"experts": {c: self.experts[str(c)].get("hash") for c in self.routed_experts()},
                          "clusters": (self.stages.get("cluster") or {}).get("outputs"),
                          "router": (self.stages.get("router") or {}).get("outputs"),
                          "routing": {k: self.routing_value(k) for k in sorted(self.routing)}, "ensemble": ensemble})


def fill_added_settings(config: dict | None) -> None:
    """Settings a run's config predates, filled (in place) with what that run was built with, never with today's
    defaults: no seed-phase share (`seed.pretrain_share`, default now 0.75), centroid routing
    (`ensemble.router`, default now "prefix"), no tuned route temperature (`ensemble.tune_docs`, default now
    200) and no evidence reweighting (`ensemble.evidence_weight`, default now 0.5). Early schema-2 runs lack them
    too."""
    if config and "seed" in config:
        config["seed"].setdefault("pretrain_share", 0.0)
    if config and "ensemble" in config:
        config["ensemble"].setdefault("router", "centroid")
        config["ensemble"].setdefault("tune_docs", 0)
        config["ensemble"].setdefault("evidence_weight", 0.0)


def migrate_v1(data: dict, root: Path) -> dict:
    """A schema-1 manifest as schema 2, in memory (the file is rewritten only when the run is next updated).

    Schema 1 kept the routing temperature as ``temperature`` (top level and in the ``ensemble`` config section)
    beside ``top_k``; it was tuned when ``eval/temperature.json`` chose it. It had no seed phase unless
    ``seed.pretrain_tokens`` asked for one, and then on top of the training budget (now it is part of it).
    """
    data = json.loads(json.dumps(data))
    config = data.setdefault("config", {})
    ensemble = config.setdefault("ensemble", {})
    if "temperature" in ensemble:
        ensemble["route_temperature"] = ensemble.pop("temperature")
    seed, train = config.setdefault("seed", {}), config.setdefault("train", {})
    fill_added_settings(config)  # the sections exist now: schema 1 had neither setting
    if seed.get("pretrain_tokens") and train.get("total_tokens"):
        train["total_tokens"] += seed["pretrain_tokens"]  # the experts keep the budget they were trained with
    temperature, top_k = data.pop("temperature", None), data.pop("top_k", None)
    tuned_file = Path(root) / "eval" / "temperature.json"
    tuned = False
    if temperature is not None and tuned_file.exists():
        with contextlib.suppress(OSError, ValueError):
            tuned = json.loads(tuned_file.read_text()).get("best") == temperature
    data["routing"] = {} if temperature is None else {
        "route_temperature": {"value": temperature, "source": "tuned" if tuned else "config"},
        "top_k": {"value": top_k, "source": "config"}}
    data["schema_version"] = SCHEMA_VERSION
    return data


class RunDir:
    """Every path of one run directory, and access to its manifest."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    manifest_path = property(lambda self: self.root / "manifest.json")
    config_path = property(lambda self: self.root / "config.toml")
    lock_path = property(lambda self: self.root / ".lock")
    corpus_path = property(lambda self: self.root / "corpus" / "docs.parquet")
    ingest_report_path = property(lambda self: self.root / "corpus" / "ingest.json")
    embeddings_dir = property(lambda self: self.root / "embeddings")
    choose_k_dir = property(lambda self: self.root / "choose_k")
    clusters_dir = property(lambda self: self.root / "clusters")
    centroids_path = property(lambda self: self.root / "clusters" / "centroids.npy")
    assignments_path = property(lambda self: self.root / "clusters" / "assignments.parquet")
    router_dir = property(lambda self: self.root / "router")
    tokenizer_dir = property(lambda self: self.root / "tokenizer")
    seed_dir = property(lambda self: self.root / "seed")
    pretrained_dir = property(lambda self: self.root / "pretrained")
    experts_root = property(lambda self: self.root / "experts")
    checkpoints_root = property(lambda self: self.root / "checkpoints")
    token_cache = property(lambda self: self.root / ".cache" / "tokens")  # hidden: in no content hash
    router_cache = property(lambda self: self.root / ".cache" / "router")  # embedded prefixes of the router
    eval_dir = property(lambda self: self.root / "eval")
    results_path = property(lambda self: self.root / "eval" / "results.json")
    temperature_path = property(lambda self: self.root / "eval" / "temperature.json")
    harness_path = property(lambda self: self.root / "eval" / "harness.json")
    baselines_root = property(lambda self: self.root / "baselines")
    plots_dir = property(lambda self: self.root / "plots")
    report_path = property(lambda self: self.root / "report.md")
    done_path = property(lambda self: self.root / "DONE")

    def expert_dir(self, cluster_id: int) -> Path:
        return self.experts_root / str(int(cluster_id))

    def checkpoint_dir(self, cluster_id: int | str) -> Path:
        """Checkpoints of expert ``cluster_id`` while it trains ("seed": the seed phase)."""
        return self.checkpoints_root / str(cluster_id)

    def branch_dir(self, seed_phase: bool) -> Path:
        """Where experts branch from: the pretrained seed after a seed phase, else the seed."""
        return self.pretrained_dir if seed_phase else self.seed_dir

    def baseline_dir(self, kind: str) -> Path:
        return self.baselines_root / kind

    def stage_output(self, stage: str) -> Path:
        """The artifact whose content hash records that ``stage`` is done (one table for every flow)."""
        outputs = {"ingest": self.corpus_path, "embed": self.embeddings_dir, "cluster": self.clusters_dir,
                   "choose_k": self.choose_k_dir, "tokenizer": self.tokenizer_dir, "seed": self.seed_dir,
                   "pretrain": self.pretrained_dir, "router": self.router_dir, "assemble": self.report_path,
                   "tune": self.temperature_path}
        if stage not in outputs:
            raise ValueError(f"stage {stage!r} has no single output: use one of {', '.join(outputs)}")
        return outputs[stage]

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def _rebuild_hint(self) -> str:
        # The manifest is what makes the other files a run (their hashes, which experts are finished); without it
        # nothing can be trusted, so the way back is a copy of it or a new build from the run's own settings.
        return (f"restore it from a copy, or rebuild the run in a new directory with "
                f"`cbtm run --config {self.config_path} --out NEW_DIR`")

    def repair_hint(self) -> str:
        """How to rewrite a damaged file of a stage: `cbtm run`, which checks every stage's files and redoes the
        damaged ones, unless `cbtm add` grew the run (`cbtm run` refuses to rebuild it from its first corpus)."""
        try:
            grown = bool(self.read_manifest().additions)
        except IncompatibleRunError:
            grown = False  # the manifest's own message comes when the run is read
        if grown:
            return "restore it from a copy (`cbtm run` does not rebuild a run grown by `cbtm add`)"
        return f"repair it with `cbtm run --out {self.root}`"

    def read_manifest(self) -> Manifest:
        if not self.manifest_path.exists():
            raise IncompatibleRunError(f"{self.root} is not a cbtm run directory (no manifest.json): build one with "
                                       f"`cbtm run --out {self.root}`")
        try:
            data = read_json(self.manifest_path)
        except ValueError as exc:  # read_json's, from json's JSONDecodeError or a UnicodeDecodeError
            raise IncompatibleRunError(f"{self.manifest_path} is corrupt ({type(exc.__cause__).__name__}): "
                                       f"{self._rebuild_hint()}") from exc
        if not isinstance(data, dict):
            raise IncompatibleRunError(f"{self.manifest_path} is corrupt (not a JSON object): {self._rebuild_hint()}")
        return Manifest.from_json(data, self.manifest_path)

    def write_manifest(self, manifest: Manifest) -> None:
        atomic_write_text(self.manifest_path, json.dumps(manifest.to_json(), indent=2, sort_keys=False) + "\n")

    def record_stage(self, manifest: Manifest, stage: str, inputs: str, outputs: str | None) -> None:
        """Mark ``stage`` done with the hashes of its inputs and outputs and persist the manifest."""
        manifest.stages[stage] = {"inputs": inputs, "outputs": outputs,
                                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.write_manifest(manifest)

    def check_usable_as_output(self) -> None:
        """Refuse, before anything is written, an output path that is a file, unwritable, or a non-empty
        directory that is not a cbtm run (adopting it would mix cbtm's files with the user's)."""
        root = self.root
        if root.exists() and not root.is_dir():
            raise UserInputError(f"--out {root} is a file, not a directory: pass a new or existing run directory")
        if root.is_dir() and not self.exists() and any(p.name != ".lock" for p in root.iterdir()):
            raise UserInputError(f"--out {root} is a non-empty directory that is not a cbtm run: pass a new "
                                 "directory (cbtm never writes into a folder it did not create)")
        probe = root if root.exists() else next((p for p in root.absolute().parents if p.exists()), Path("/"))
        if not os.access(probe, os.W_OK | os.X_OK):
            raise UserInputError(f"--out {root}: {probe} is not writable: pick a directory you can write to")

    @contextlib.contextmanager
    def writing(self, command: str) -> Iterator[None]:
        """Hold the run's writer lock (`.lock`, released by the OS even on kill -9) while ``command`` runs."""
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                raise UserInputError(f"run {self.root} is being written by {holder}: wait for it to finish") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} (cbtm {command})".encode(), 0)
            yield
        finally:
            os.close(fd)  # closing releases the lock
