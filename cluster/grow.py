"""Growing a finished run with new documents (`cbtm add`): which join an existing cluster, which form new ones.

Plain functions over files, no Prefect. `new_documents` keeps the ingested documents the run does not have yet;
`check_embedder` proves this machine's embedder reproduces the run's stored vectors; `stage_growth` places every
new document — it joins its nearest cluster when it is as close as that cluster's own training documents
usually are (`join_thresholds`), the rest form new clusters — and writes the grown corpus, embeddings and
clusters into a staging directory, which the flow swaps in once the new experts exist. Old rows, old centroids
and old shard files are never changed: the staging copies of unchanged files are hard links.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster.choose_k import best_k, score_ks
from cluster.config import AUTO_NEW_K, ClusterConfig, EmbedConfig, GrowConfig
from cluster.corpus import document_id, read_documents
from cluster.embed import claim_embed_dir, encode_length_sorted, load_embeddings, shard_paths
from cluster.kmeans import SphericalKMeans, normalize_rows, read_clusters, squared_distances, write_clusters
from cluster.report import describe_clusters, label_summary
from ground.arrays import load_npy
from ground.errors import UserInputError
from ground.files import atomic_write_text, read_json
from ground.progress import progress
from ground.rundir import RunDir

log = logging.getLogger(__name__)
CHECK_DOCS = 8         # documents of the run re-embedded to prove the embedder is the one that built it
MIN_COSINE = 0.98      # float16 shards and other CPUs reproduce a vector to ~0.9999


def new_documents(run_corpus: Path, added_corpus: Path) -> tuple[pa.Table, int]:
    """The rows of ``added_corpus`` (ingested by the run's cleaning rules) whose id or text the run does not
    have yet, and how many it already had."""
    old = read_documents(run_corpus, columns=["id", "text"])
    known_ids = set(old.column("id").to_pylist())
    known_texts = {document_id(t) for t in old.column("text").to_pylist()}
    added = read_documents(added_corpus)
    keep = [i not in known_ids and document_id(t) not in known_texts
            for i, t in zip(added.column("id").to_pylist(), added.column("text").to_pylist())]
    return added.filter(pa.array(keep, pa.bool_())), len(keep) - sum(keep)


def check_embedder(embedder, run: RunDir) -> None:
    """UserInputError unless ``embedder`` gives the run's stored vectors for the run's first documents (a run
    built with another embedder version would place new documents in another space)."""
    ids, vectors = load_embeddings(run.embeddings_dir)
    docs = read_documents(run.corpus_path, columns=["id", "text"]).slice(0, CHECK_DOCS)
    if docs.column("id").to_pylist() != ids[:len(docs)]:
        raise UserInputError(f"run {run.root}: its embeddings do not match its corpus: rebuild the run")
    again = normalize_rows(embedder.encode(docs.column("text").to_pylist()).astype(np.float32))
    cosine = (again * normalize_rows(vectors[:len(docs)])).sum(1)
    if cosine.min() < MIN_COSINE:
        raise UserInputError(f"run {run.root} was embedded by another embedder version (this one reproduces its "
                             f"vectors only to cosine {cosine.min():.3f}): add with the cbtm and "
                             "sentence-transformers versions that built it, or rebuild the run")


def join_thresholds(distance: np.ndarray, cluster_id: np.ndarray, train: np.ndarray, n_clusters: int,
                    percentile: float) -> np.ndarray:
    """float32 [n_clusters]: the ``percentile``-th percentile of each cluster's training documents' squared
    distances to its centroid; -inf for a cluster without training documents (nothing joins it)."""
    out = np.full(n_clusters, -np.inf, np.float32)
    for c in range(n_clusters):
        members = distance[train & (cluster_id == c)]
        if len(members):
            out[c] = np.percentile(members, percentile)
    return out


def place(d2: np.ndarray, thresholds: np.ndarray, joinable: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest joinable cluster int64 [n] of every row of d2 (float [n, k] squared distances) and whether the
    row joins it (bool [n]: its distance is at most that cluster's threshold)."""
    masked = np.where(joinable[None, :], d2, np.inf)
    nearest = masked.argmin(1)
    return nearest, masked[np.arange(len(d2)), nearest] <= thresholds[nearest]


def choose_new_k(x: np.ndarray, requested: int | None, seed: int, min_size: int = 2) -> int:
    """How many new clusters the rows x [n, d] form: ``requested``, or by silhouette among the AUTO_NEW_K that
    leave at least ``min_size`` rows per cluster on average (one cluster when too few rows for two, none when
    too few for one: an expert of a handful of documents is not worth its memory, and an addition from the
    run's own domains always leaves some documents past the join percentile)."""
    if requested is not None:
        if requested > len(x):
            raise UserInputError(f"--new-clusters {requested} but only {len(x)} new training document(s) are far "
                                 "from every cluster: pass a smaller --new-clusters (or auto)")
        return requested
    ks = [k for k in AUTO_NEW_K if k <= len(x) // max(2, min_size)]
    if not ks:
        return 1 if len(x) >= max(1, min_size) else 0
    return best_k(score_ks(x, ks, seed=seed))


def auto_min_size(assignments: pa.Table, train: np.ndarray, joinable: np.ndarray) -> int:
    """Fewest training documents per new cluster that ``--new-clusters auto`` allows: half the median training
    cluster of the run (silhouette alone favours many tiny clusters on a small addition, and an expert of a few
    documents is not worth its memory)."""
    ids = assignments.column("train_cluster_id").to_numpy()[train]
    sizes = np.bincount(ids, minlength=len(joinable))[joinable]
    return max(2, int(np.median(sizes)) // 2) if len(sizes) else 2


def _placement(vectors: np.ndarray, centroids: np.ndarray, thresholds: np.ndarray, joinable: np.ndarray,
               train: np.ndarray, grow: GrowConfig, n_init: int,
               min_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(all centroids float32 [k_old + k_new, d], training cluster int64 [n] of every new row, k_new)."""
    x = normalize_rows(vectors)
    nearest, joins = place(squared_distances(x, centroids), thresholds, joinable)
    rest = ~joins & train
    k_new = 0 if grow.new_clusters == 0 else choose_new_k(x[rest], grow.new_clusters, grow.seed, min_size)
    target = nearest.copy()
    if not k_new:
        if grow.new_clusters is None and rest.any():
            log.info("add: %d new training document(s) far from every cluster are too few for a new expert (auto "
                     "needs %d): they join their nearest clusters (--new-clusters 1 makes one anyway)",
                     int(rest.sum()), min_size)
        return centroids, target, 0
    model = SphericalKMeans(k_new, n_init=n_init, random_state=grow.seed, compute_labels=False).fit(x[rest])
    target[rest] = len(centroids) + model.predict(x[rest])
    return np.vstack([centroids, model.cluster_centers_]).astype(np.float32), target, k_new


def stage_growth(run: RunDir, added: pa.Table, embedder, embed_cfg: EmbedConfig, cluster_cfg: ClusterConfig,
                 grow: GrowConfig, joinable: np.ndarray, label_field: str | None, staging: Path) -> dict:
    """Embed ``added`` (new ingested rows) with the run's ``embedder``, place them, and write the grown run's
    ``corpus/``, ``embeddings/`` and ``clusters/`` under ``staging``. ``joinable``: bool [k] clusters new
    documents may join (trained, not removed). Returns the addition's summary (JSON-able)."""
    assignments = pq.read_table(run.assignments_path)
    centroids = load_npy(run.centroids_path).astype(np.float32)
    train_old = np.array(assignments.column("split").to_pylist()) == "train"
    thresholds = join_thresholds(assignments.column("distance").to_numpy(), assignments.column("cluster_id")
                                 .to_numpy(), train_old, len(centroids), grow.join_percentile)
    texts = added.column("text").to_pylist()
    bar = progress(total=len(texts), desc="embed new documents", unit="doc")
    vectors = encode_length_sorted(embedder, texts, bar.update)
    bar.close()
    train = np.array(added.column("split").to_pylist()) == "train"
    all_centroids, target, k_new = _placement(vectors, centroids, thresholds, joinable, train, grow,
                                              cluster_cfg.n_init, auto_min_size(assignments, train_old, joinable))
    d2 = squared_distances(normalize_rows(vectors), all_centroids)
    labels = d2.argmin(1).astype(np.int32)  # routing's label: the nearest centroid, old or new
    train_labels = np.where(train, target, labels).astype(np.int32)
    staging = Path(staging)
    corpus = _stage_corpus(run, added, staging / "corpus")
    _stage_embeddings(run, vectors, embed_cfg, corpus, staging / "embeddings")
    new_rows = pa.table({"id": added.column("id"), "split": added.column("split"),
                         "cluster_id": pa.array(labels, pa.int32()),
                         "distance": pa.array(d2[np.arange(len(d2)), labels], pa.float32()),
                         "train_cluster_id": pa.array(train_labels, pa.int32())})
    _stage_clusters(run, corpus, pa.concat_tables([assignments, new_rows]), all_centroids, label_field,
                    cluster_cfg.n_keywords, staging / "clusters")
    old_k = len(centroids)
    joined = train & (train_labels < old_k)
    summary = {"documents": int(len(added)), "train": int(train.sum()), "old_clusters": old_k,
               "join_percentile": grow.join_percentile,
               "thresholds": [float(t) if np.isfinite(t) else None for t in thresholds],
               "joined": {str(c): int((joined & (train_labels == c)).sum()) for c in range(old_k)
                          if (joined & (train_labels == c)).any()},
               "new_clusters": list(range(old_k, old_k + k_new)),
               # training documents, as "joined" counts: held-out ones only take the nearest centroid's label
               "new_cluster_sizes": {str(c): int((train & (train_labels == c)).sum())
                                     for c in range(old_k, old_k + k_new)}}
    per_cluster = ", ".join(f"{c}: {n}" for c, n in summary["joined"].items()) or "none"
    new = ", ".join(f"{c}: {n}" for c, n in summary["new_cluster_sizes"].items()) or "none"
    log.info("add: %d new document(s): %d training ones join existing clusters (%s), %d form %d new cluster(s) (%s)",
             len(added), int(joined.sum()), per_cluster, int((train & ~joined).sum()), k_new, new)
    return summary


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # the staged file is the old one: nothing rewritten, nothing duplicated on disk
    except OSError:
        dst.write_bytes(src.read_bytes())


def _stage_corpus(run: RunDir, added: pa.Table, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    old = pq.read_table(run.corpus_path)
    grown = pa.concat_tables([old, added], promote_options="permissive")  # a column only one side has: nulls
    path = out_dir / run.corpus_path.name
    pq.write_table(grown, path)
    if run.ingest_report_path.exists():
        _link_or_copy(run.ingest_report_path, out_dir / run.ingest_report_path.name)
    return path


def _stage_embeddings(run: RunDir, vectors: np.ndarray, cfg: EmbedConfig, corpus: Path, out_dir: Path) -> None:
    """Old full shards linked, the last partial one rewritten with the first new rows, then new shards."""
    meta = read_json(run.embeddings_dir / "meta.json")
    size, n_old = meta["shard_size"], meta["n_docs"]
    out_dir.mkdir(parents=True, exist_ok=True)
    claim_embed_dir(cfg, corpus, out_dir)  # embedder.json for the grown corpus, written before any shard
    first = n_old // size  # the first shard that changes
    for src in run.embeddings_dir.iterdir():
        name = src.name
        if name.startswith("shard-") and int(name[6:11]) < first:
            _link_or_copy(src, out_dir / name)
        elif src.is_dir():  # tfidf/: the fitted embedder, unchanged
            (out_dir / name).mkdir(exist_ok=True)
            for f in src.iterdir():
                _link_or_copy(f, out_dir / name / f.name)
    ids = read_documents(corpus, columns=["id"]).column("id").to_pylist()
    _, old_vectors = load_embeddings(run.embeddings_dir)
    tail = np.concatenate([old_vectors[first * size:], vectors]).astype(meta["dtype"])
    for i, lo in enumerate(range(first * size, len(ids), size)):
        vec_path, ids_path = shard_paths(out_dir, first + i)
        np.save(vec_path, tail[lo - first * size:lo - first * size + size])
        ids_path.write_text(json.dumps(ids[lo:lo + size]))
    atomic_write_text(out_dir / "meta.json", json.dumps({**meta, "n_docs": len(ids),
                                                        "n_shards": -(-len(ids) // size)}, indent=2))


def _stage_clusters(run: RunDir, corpus: Path, assignments: pa.Table, centroids: np.ndarray,
                    label_field: str | None, n_keywords: int, out_dir: Path) -> None:
    """clusters.json of the grown run: old clusters keep their words and nearest documents (what their experts
    were trained on) with updated sizes; new clusters are described among all of them."""
    old = read_clusters(run.clusters_dir)
    docs = read_documents(corpus, columns=["id", "text"] + ([label_field] if label_field else []))
    labels = assignments.column("cluster_id").to_numpy().astype(np.int64)
    train_labels = assignments.column("train_cluster_id").to_numpy().astype(np.int64)
    distance = assignments.column("distance").to_numpy()
    split = np.array(assignments.column("split").to_pylist())
    train = split == "train"
    k = len(centroids)
    summary = describe_clusters(docs.column("text").to_pylist(), labels, distance, train, k, n_keywords)
    for c in summary:
        c["size_train_balanced"] = int(((train_labels == c["cluster_id"]) & train).sum())
        if c["cluster_id"] < len(old["clusters"]):
            previous = old["clusters"][c["cluster_id"]]
            c.update(keywords=previous["keywords"], nearest=previous["nearest"])
        else:
            c["added"] = True
    meta = {**{key: old.get(key) for key in ("inertia", "balanced", "capacity")}, "n_clusters": k,
            "clusters": summary}
    if label_field:
        meta["label_quality"] = label_summary(docs.column(label_field).to_pylist(), labels, train_labels, train,
                                              summary, label_field)
    write_clusters(out_dir, centroids, assignments.column("id").to_pylist(), split, labels, distance, train_labels,
                   meta)
