import gzip
import json

import pyarrow.parquet as pq
import pytest

from cluster.config import CorpusConfig
from cluster.corpus import heldout, ingest_corpus, read_documents
from ensemble.rundir import UserInputError
from tests.conftest import demo_records, write_jsonl


def test_ingest_cleans_deduplicates_and_splits(tmp_path):
    records = demo_records(10)
    dup = dict(records[0], id="copy")
    rows = records + [dup, {"text": "  short ", "domain": "x"}, {"text": None, "domain": "x"}]
    corpus = write_jsonl(tmp_path / "c.jsonl", rows)
    out = ingest_corpus(CorpusConfig(path=str(corpus), heldout_fraction=0.2), tmp_path / "docs.parquet")
    table = pq.read_table(out)
    assert table.num_rows == len(records)  # duplicate, too-short and null texts dropped
    assert set(table.column_names) >= {"id", "text", "split", "domain"}
    assert set(table.column("split").to_pylist()) <= {"train", "heldout"}
    assert len(set(table.column("id").to_pylist())) == len(records)
    assert all(t == t.strip() for t in table.column("text").to_pylist())


def test_split_depends_only_on_the_id(tmp_path):
    records = demo_records(20)
    small = ingest_corpus(CorpusConfig(path=str(write_jsonl(tmp_path / "a.jsonl", records[:30]))), tmp_path / "a.pq")
    big = ingest_corpus(CorpusConfig(path=str(write_jsonl(tmp_path / "b.jsonl", records))), tmp_path / "b.pq")
    split_small = dict(zip(*[read_documents(small).column(c).to_pylist() for c in ("id", "split")]))
    split_big = dict(zip(*[read_documents(big).column(c).to_pylist() for c in ("id", "split")]))
    assert all(split_big[i] == s for i, s in split_small.items())
    assert heldout("doc-x", 0.0) is False and heldout("doc-x", 1.0) is True


def test_id_field_is_kept_and_gzip_and_csv_are_read(tmp_path):
    records = demo_records(5)
    gz = tmp_path / "c.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    out = ingest_corpus(CorpusConfig(path=str(gz), id_field="id"), tmp_path / "gz.parquet")
    assert sorted(read_documents(out).column("id").to_pylist()) == sorted(r["id"] for r in records)
    csv = tmp_path / "c.csv"
    import pandas as pd

    pd.DataFrame(records).to_csv(csv, index=False)
    out = ingest_corpus(CorpusConfig(path=str(csv)), tmp_path / "csv.parquet")
    assert read_documents(out).num_rows == len(records)


@pytest.mark.parametrize("case", ["missing", "empty", "no_field", "unknown_format", "all_short"])
def test_bad_corpus_is_one_clear_error_and_leaves_nothing(tmp_path, case):
    path = tmp_path / "c.jsonl"
    if case == "empty":
        path.write_text("")
    elif case == "no_field":
        write_jsonl(path, [{"body": "some long enough text here", "domain": "x"}])
    elif case == "unknown_format":
        path = tmp_path / "c.docx"
        path.write_text("x")
    elif case == "all_short":
        write_jsonl(path, [{"text": "tiny"}])
    out = tmp_path / "out" / "docs.parquet"
    with pytest.raises(UserInputError) as err:
        ingest_corpus(CorpusConfig(path=str(path)), out)
    message = str(err.value)
    assert "\n" not in message
    expected = {"missing": "does not exist", "empty": "empty", "no_field": "no text field 'text'; its fields are body",
                "unknown_format": "unknown format", "all_short": "empty after cleaning"}[case]
    assert expected in message
    assert not out.exists()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
