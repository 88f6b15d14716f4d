"""A small corpus, assignments, a trained tokenizer and a tiny seed, shared by the expert tests."""
import pytest

from cluster.config import CorpusConfig
from cluster.corpus import ingest_corpus, read_documents
from experts.config import SeedConfig
from experts.seed import build_seed
from experts.tokenizer import train_tokenizer
from tests.conftest import demo_records, write_jsonl


def write_assignments(path, docs, cluster_ids, train_cluster_ids=None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"id": docs.column("id"), "split": docs.column("split"),
               "cluster_id": pa.array(cluster_ids, pa.int32()),
               "distance": pa.array([0.0] * docs.num_rows, pa.float32())}
    if train_cluster_ids is not None:
        columns["train_cluster_id"] = pa.array(train_cluster_ids, pa.int32())
    pq.write_table(pa.table(columns), path)
    return path


@pytest.fixture(scope="package")
def seeded(tmp_path_factory):
    """(root, corpus, assignments putting every document in cluster 0, seed dir of a tiny preset)."""
    root = tmp_path_factory.mktemp("experts")
    corpus = ingest_corpus(CorpusConfig(path=str(write_jsonl(root / "c.jsonl", demo_records(12, ("cooking",)))),
                                        heldout_fraction=0.25), root / "docs.parquet")
    docs = read_documents(corpus)
    assignments = write_assignments(root / "assignments.parquet", docs, [0] * docs.num_rows)
    cfg = SeedConfig(model="preset:tiny", vocab_size=400, max_position_embeddings=64)
    tok_dir = train_tokenizer(cfg, corpus, root / "tokenizer")
    seed_dir = build_seed(cfg, tok_dir, root / "seed")
    return root, corpus, assignments, seed_dir
