"""The run directory: the contract between stages.

Layout (relative to the run directory)::

    manifest.json              versioned manifest (format line, config, stages, experts table, versions)
    config.toml                the pipeline config used
    corpus/docs.parquet        id, text, split ("train"/"heldout"), any extra corpus fields
    embeddings/                shard-00000.npy (float16, [n, d]) + shard-00000.ids.json
    clusters/                  centroids.npy (float32, [k, d]), assignments.parquet, clusters.json
    tokenizer/                 the shared tokenizer (save_pretrained)
    seed/                      the seed model every expert branches from (save_pretrained)
    experts/<cluster_id>/      one expert (save_pretrained safetensors + tokenizer + metrics.jsonl + expert.json)
    report.md, plots/*.png     what a person reads
    DONE                       written last, when every stage is complete

Every artifact is written to a temporary sibling and renamed into place, so a killed run never leaves a
half-written artifact behind; the manifest is only updated after the artifact it describes is in place.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

FORMAT = "cbtm-run"
SCHEMA_VERSION = 1
STAGES = ("ingest", "embed", "cluster", "train", "assemble")


class UserInputError(ValueError):
    """Bad input a user can fix; the CLI prints its message on one line and exits with code 2."""


class IncompatibleRunError(UserInputError):
    """The run directory is incomplete, corrupt or from another schema version."""


# ---------------------------------------------------------------------------------------------- atomic writes
def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same directory and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``final`` only if the block succeeds.

    The old directory (if any) is moved aside first and deleted after the new one is in place, so a
    reader that already opened files from the old directory keeps working on them.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}-{time.monotonic_ns()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def clean_stale_temporaries(root: Path) -> None:
    """Remove temporaries a killed run left behind (``.name.*.tmp`` and ``.name.old-*``)."""
    for path in Path(root).rglob(".*"):
        if path.name.endswith(".tmp") or ".old-" in path.name:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- hashing
def hash_json(obj: Any) -> str:
    """sha256 of a JSON-serialisable object with sorted keys (stable across runs)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 hex digest of one file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_path(path: Path, ignore: tuple[str, ...] = ()) -> str | None:
    """Content hash of a file or a directory tree (relative names + bytes); None if it does not exist."""
    path = Path(path)
    if not path.exists():
        return None
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        rel = file.relative_to(path).as_posix() if path.is_dir() else file.name
        if rel.startswith(".") or "/." in rel or file.name in ignore:
            continue
        h.update(rel.encode() + b"\0")
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour defines a run."""
    from importlib import metadata

    out = {}
    for name in ("cbtm", "torch", "transformers", "sentence-transformers", "scikit-learn", "numpy",
                 "tokenizers", "datasets", "prefect"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


# ---------------------------------------------------------------------------------------------- manifest
@dataclass
class Manifest:
    """In-memory view of ``manifest.json``.

    ``stages[name] = {"inputs": sha256, "outputs": sha256, "finished_at": iso time}``;
    ``experts[str(cluster_id)] = {"path": "experts/<i>", "hash": sha256, "val_loss": float | None, ...}``.
    """

    config: dict = field(default_factory=dict)
    stages: dict = field(default_factory=dict)
    experts: dict = field(default_factory=dict)
    embedder: str | None = None
    temperature: float | None = None
    top_k: int | None = None
    n_clusters: int | None = None
    versions: dict = field(default_factory=library_versions)
    created_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def to_json(self) -> dict:
        return {"format": FORMAT, "schema_version": SCHEMA_VERSION, "created_at": self.created_at,
                "config": self.config, "embedder": self.embedder, "temperature": self.temperature,
                "top_k": self.top_k, "n_clusters": self.n_clusters, "stages": self.stages,
                "experts": self.experts, "versions": self.versions}

    @classmethod
    def from_json(cls, data: dict, where: Path) -> "Manifest":
        if data.get("format") != FORMAT:
            raise IncompatibleRunError(f"{where} is not a cbtm run manifest (format={data.get('format')!r})")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise IncompatibleRunError(
                f"{where} has schema version {data.get('schema_version')}, this cbtm reads version "
                f"{SCHEMA_VERSION}: rebuild the run with this version (cbtm run --out NEW_DIR)")
        keys = ("config", "stages", "experts", "embedder", "temperature", "top_k", "n_clusters",
                "versions", "created_at")
        return cls(**{k: data[k] for k in keys if k in data})


class RunDir:
    """Paths and manifest access for one run directory."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    manifest_path = property(lambda self: self.root / "manifest.json")
    config_path = property(lambda self: self.root / "config.toml")
    corpus_path = property(lambda self: self.root / "corpus" / "docs.parquet")
    embeddings_dir = property(lambda self: self.root / "embeddings")
    clusters_dir = property(lambda self: self.root / "clusters")
    tokenizer_dir = property(lambda self: self.root / "tokenizer")
    seed_dir = property(lambda self: self.root / "seed")
    experts_root = property(lambda self: self.root / "experts")
    eval_dir = property(lambda self: self.root / "eval")
    plots_dir = property(lambda self: self.root / "plots")
    report_path = property(lambda self: self.root / "report.md")
    done_path = property(lambda self: self.root / "DONE")

    def expert_dir(self, cluster_id: int) -> Path:
        return self.experts_root / str(int(cluster_id))

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def read_manifest(self) -> Manifest:
        if not self.manifest_path.exists():
            raise IncompatibleRunError(
                f"{self.root} is not a cbtm run directory (no manifest.json): build one with `cbtm run --out {self.root}`")
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise IncompatibleRunError(f"{self.manifest_path} is corrupt ({exc}): rebuild the run") from exc
        return Manifest.from_json(data, self.manifest_path)

    def write_manifest(self, manifest: Manifest) -> None:
        atomic_write_text(self.manifest_path, json.dumps(manifest.to_json(), indent=2, sort_keys=False) + "\n")

    def record_stage(self, manifest: Manifest, stage: str, inputs: str, outputs: str | None) -> None:
        """Mark ``stage`` done with the hashes of its inputs and outputs and persist the manifest."""
        manifest.stages[stage] = {"inputs": inputs, "outputs": outputs,
                                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.write_manifest(manifest)
