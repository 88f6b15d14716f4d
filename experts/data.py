"""Training data for experts: the corpus tokenized once with `datasets.map` (cached), one token stream per
cluster and split written as a memory-mapped ``.npy`` file, and a seeded sampler of packed blocks.

Memory stays bounded by the cache's chunk size, not the corpus: the tokenized corpus is a memory-mapped
Arrow file, and a cluster's stream is written chunk by chunk and read back with ``mmap_mode="r"``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ground.arrays import load_npy
from ground.files import hash_path

log = logging.getLogger(__name__)

ROWS_PER_CHUNK = 4096
PIECE_CHARS = 100_000  # a longer document is tokenized in pieces of at most this many characters
_BEFORE_WORD = re.compile(r"\S\s")  # read backwards: a whitespace character followed by a word character


def default_cache_dir() -> Path:
    """``$HF_DATASETS_CACHE/cbtm-tokens``: where tokenized corpora live unless a directory is given."""
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "cbtm-tokens"


def _tokenizer_key(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{blob}\0{tokenizer.eos_token_id}".encode()).hexdigest()


def _file_key(path: Path) -> str:
    # Size + mtime, not content: artifacts are replaced by atomic renames, which always change the mtime.
    st = Path(path).stat()
    return f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}"


def tokenize_corpus(tokenizer, corpus_path: Path, cache_dir: Path | None = None):
    """The ingested corpus tokenized: a memory-mapped `datasets.Dataset` with columns id, split,
    input_ids (int32 [n_i], each document followed by eos) and n (int32, = len(input_ids)), in corpus order.

    Computed once per (tokenizer, corpus file) with `datasets.map` into ``cache_dir`` and reused after.
    """
    import datasets

    cache_dir = Path(cache_dir or default_cache_dir())
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(f"{_tokenizer_key(tokenizer)}\0{_file_key(corpus_path)}".encode()).hexdigest()[:24]
    cache_file = cache_dir / f"tokens-{key}.arrow"
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        if cache_file.exists():
            return datasets.Dataset.from_file(str(cache_file))
        docs = datasets.Dataset.from_parquet(str(corpus_path), columns=["id", "split", "text"],
                                             cache_dir=str(cache_dir / "corpus"))
        features = datasets.Features({"id": docs.features["id"], "split": docs.features["split"],
                                      "input_ids": datasets.Sequence(datasets.Value("int32")),
                                      "n": datasets.Value("int32")})
        # The cache file is named by our own key, so datasets need not hash the tokenizer (slow, unstable).
        return docs.map(_encode, batched=True, batch_size=1000, fn_kwargs={"tokenizer": tokenizer},
                        remove_columns=["text"], features=features, cache_file_name=str(cache_file),
                        new_fingerprint=key, desc="tokenize")
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _encode(batch: dict, tokenizer) -> dict:
    eos = tokenizer.eos_token_id
    texts = batch["text"]
    short = [i for i, t in enumerate(texts) if len(t) <= PIECE_CHARS]
    ids: list = [None] * len(texts)
    if short:
        for i, doc in zip(short, tokenizer([texts[i] for i in short], add_special_tokens=False,
                                           return_attention_mask=False)["input_ids"]):
            ids[i] = np.asarray(doc + [eos], dtype=np.int32)
    for i in (i for i, t in enumerate(texts) if len(t) > PIECE_CHARS):
        ids[i] = _encode_long(tokenizer, texts[i], eos)
    return {"id": batch["id"], "split": batch["split"], "input_ids": ids, "n": [len(d) for d in ids]}


def pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """``text`` cut into pieces of at most ``size`` characters, each cut just before the whitespace character
    that precedes a word (a byte-level BPE tokenizes such pieces exactly as the whole); a stretch without such a
    place is cut at ``size``."""
    out, start = [], 0
    while len(text) - start > size:
        window = text[start:start + size]
        hit = next((m.start() for m in _BEFORE_WORD.finditer(window[::-1])), None)
        cut = None if hit is None else len(window) - 2 - hit  # index of that whitespace character
        end = start + (cut if cut else size)
        out.append(text[start:end])
        start = end
    return out + [text[start:]]


def _encode_long(tokenizer, text: str, eos: int) -> np.ndarray:
    """Token ids (int32, eos last) of a long text, tokenized piece by piece so that memory stays bounded (a fast
    tokenizer's encodings cost about 100 bytes per token)."""
    parts = []
    chunks = pieces(text)
    for lo in range(0, len(chunks), 16):
        for doc in tokenizer(chunks[lo:lo + 16], add_special_tokens=False, return_attention_mask=False)["input_ids"]:
            parts.append(np.asarray(doc, dtype=np.int32))
    parts.append(np.array([eos], dtype=np.int32))
    return np.concatenate(parts)


def wanted_ids(assignments_path: Path, split: str, cluster_id: int | None) -> pa.Array | None:
    """Document ids of ``split`` assigned to ``cluster_id`` (None: every document of the split).

    Training documents use the balanced ``train_cluster_id`` column when the assignments have it; held-out
    documents are always taken by their nearest centroid (``cluster_id``), as routing would send them.
    """
    if cluster_id is None:
        return None
    names = pq.read_schema(assignments_path).names
    column = "train_cluster_id" if split == "train" and "train_cluster_id" in names else "cluster_id"
    assign = pq.read_table(assignments_path, columns=["id", "split", column])
    mask = pc.and_(pc.equal(assign[column], cluster_id), pc.equal(assign["split"], split))
    return assign.filter(mask).column("id").combine_chunks()


def train_token_counts(tokens, assignments_path: Path) -> dict[int, int]:
    """Training tokens per cluster id (as `token_stream` would give them, eos included), from the ``n`` column
    of `tokenize_corpus`'s dataset joined with the assignments; clusters without documents are absent."""
    names = pq.read_schema(assignments_path).names
    column = "train_cluster_id" if "train_cluster_id" in names else "cluster_id"
    assign = pq.read_table(assignments_path, columns=["id", "split", column])
    assign = assign.filter(pc.equal(assign["split"], "train")).select(["id", column])
    lengths = tokens.data.table.select(["id", "split", "n"])
    lengths = lengths.filter(pc.equal(lengths["split"], "train")).select(["id", "n"])
    lengths = lengths.cast(pa.schema([lengths.schema.field("id"), pa.field("n", pa.int64())]))
    joined = lengths.join(assign.cast(pa.schema([lengths.schema.field("id"), assign.schema.field(column)])), "id")
    sums = joined.group_by(column).aggregate([("n", "sum")])
    return {int(c): int(n) for c, n in zip(sums[column].to_pylist(), sums["n_sum"].to_pylist())}


def token_stream(tokens, assignments_path: Path | None, cluster_id: int | None, split: str, vocab_size: int,
                 cache_dir: Path | None = None) -> np.ndarray:
    """The concatenated token ids of one cluster's ``split`` documents in corpus order (eos after each):
    a read-only memory-mapped uint16 (vocab <= 65535) or int32 array [n_tokens].

    ``tokens`` is `tokenize_corpus`'s dataset; ``cluster_id`` None takes every document of the split.
    Written once to ``cache_dir`` (atomically) and reused.
    """
    cache_dir = Path(cache_dir or default_cache_dir())
    ids = None if assignments_path is None else wanted_ids(assignments_path, split, cluster_id)
    assign_key = "all" if assignments_path is None else hash_path(assignments_path)
    source = Path(tokens.cache_files[0]["filename"]).name
    key = hashlib.sha256(f"{source}\0{assign_key}\0{cluster_id}\0{split}".encode()).hexdigest()[:24]
    path = cache_dir / f"stream-{key}.npy"
    if not path.exists():
        dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
        _write_stream(tokens.data.table, ids, split, path, dtype)
    return load_npy(path, mmap_mode="r")


def _write_stream(table: pa.Table, ids: pa.Array | None, split: str, path: Path, dtype) -> None:
    mask = pc.equal(table["split"], split)
    if ids is not None:
        mask = pc.and_(mask, pc.is_in(table["id"], value_set=ids.cast(table.schema.field("id").type)))
    total = int(pc.sum(pc.filter(table["n"], mask)).as_py() or 0)
    # A unique temporary name: experts training in parallel threads may build the same stream at once.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(total,))
    pos = 0
    for start in range(0, table.num_rows, ROWS_PER_CHUNK):
        rows = table.slice(start, ROWS_PER_CHUNK).filter(mask.slice(start, ROWS_PER_CHUNK))
        values = rows["input_ids"].combine_chunks().flatten().to_numpy()
        out[pos:pos + len(values)] = values
        pos += len(values)
    out.flush()
    del out
    os.replace(tmp, path)


class BlockSampler:
    """Seeded sampler of packed training blocks, resumable from a small JSON state.

    Epoch e cuts the stream into consecutive blocks of ``block_size`` tokens starting at a random shift
    (< block_size, so every epoch sees different windows of small clusters) and visits them in a random
    order; both come from ``np.random.default_rng([*key, e])``, so the state is just (epoch, position).
    """

    def __init__(self, n_tokens: int, block_size: int, key: tuple[int, ...]):
        if n_tokens < block_size:
            raise ValueError(f"{n_tokens} tokens cannot fill one block of {block_size}")
        self.n_tokens, self.block_size, self.key = n_tokens, block_size, tuple(int(k) for k in key)
        self.epoch, self.pos = 0, 0
        self._plan(0)

    def _plan(self, epoch: int) -> None:
        rng = np.random.default_rng([*self.key, epoch])
        shift = int(rng.integers(0, min(self.block_size, self.n_tokens - self.block_size + 1)))
        n_blocks = (self.n_tokens - shift) // self.block_size
        self._starts = shift + rng.permutation(n_blocks).astype(np.int64) * self.block_size
        self._planned = epoch

    def next(self, batch_size: int) -> np.ndarray:
        """Start offsets (int64 [batch_size]) of the next blocks, crossing into the next epoch as needed."""
        out = []
        while len(out) < batch_size:
            if self._planned != self.epoch:
                self._plan(self.epoch)
            take = self._starts[self.pos:self.pos + batch_size - len(out)]
            out.extend(take.tolist())
            self.pos += len(take)
            if self.pos >= len(self._starts):
                self.epoch, self.pos = self.epoch + 1, 0
        return np.asarray(out, dtype=np.int64)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


def gather(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> np.ndarray:
    """Blocks ``tokens[s:s+block_size]`` for every start: int64 [len(starts), block_size]."""
    return np.stack([np.asarray(tokens[s:s + block_size], dtype=np.int64) for s in starts])


def cluster_texts(corpus_path: Path, assignments_path: Path, cluster_id: int, split: str) -> list[str]:
    """Texts of one split ("train" | "heldout") assigned to ``cluster_id``, in corpus order (as trained on)."""
    wanted = set(wanted_ids(assignments_path, split, cluster_id).to_pylist())
    docs = pq.read_table(corpus_path, columns=["id", "text"], filters=[("split", "=", split)])
    return [t for i, t in zip(docs.column("id").to_pylist(), docs.column("text").to_pylist()) if i in wanted]


def pack(tokenizer, texts: list[str]) -> np.ndarray:
    """Token ids (int64 [n_tokens]) of the texts, each followed by the eos separator (no cache; small inputs)."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=np.int64)
