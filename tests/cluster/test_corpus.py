import gzip
import json

import pyarrow.parquet as pq
import pytest

from cluster.config import CorpusConfig
from cluster.corpus import heldout, ingest_corpus, read_documents
from ground.errors import UserInputError
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


def _counts(out):
    return json.loads(out.with_name("ingest.json").read_text())["counts"]


def test_txt_directory_is_one_document_per_file_with_relative_path_ids(tmp_path):
    root = tmp_path / "txt"
    records = demo_records(3)
    for i, rec in enumerate(records):
        path = root / rec["domain"] / f"{i}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rec["text"] + "\n", encoding="utf-8")
    (root / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me br\xfbl\xe9e, a long enough document".encode("latin-1"))
    (root / ".hidden.txt").write_text("a hidden file is not a document of the corpus")
    out = ingest_corpus(CorpusConfig(path=str(root)), tmp_path / "docs.parquet")
    docs = read_documents(out)
    assert sorted(docs.column("id").to_pylist()) == sorted(f"{r['domain']}/{i}.txt" for i, r in enumerate(records))
    assert sorted(docs.column("text").to_pylist()) == sorted(r["text"] for r in records)
    counts = _counts(out)
    assert counts["undecodable"] == 1 and counts["read"] == len(records) + 1 and counts["kept"] == len(records)


def test_save_to_disk_dataset_and_dataset_dict_are_read(tmp_path):
    import datasets

    records = demo_records(4)
    ds = datasets.Dataset.from_list([{"body": r["text"], "domain": r["domain"], "key": r["id"]} for r in records])
    ds.save_to_disk(str(tmp_path / "saved"))
    out = ingest_corpus(CorpusConfig(path=str(tmp_path / "saved"), text_field="body", id_field="key"),
                        tmp_path / "a.parquet")
    docs = read_documents(out)
    assert sorted(docs.column("id").to_pylist()) == sorted(r["id"] for r in records)
    assert "domain" in docs.column_names and _counts(out)["kept"] == len(records)
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(tmp_path / "dict"))
    out = ingest_corpus(CorpusConfig(path=str(tmp_path / "dict"), text_field="body"), tmp_path / "b.parquet")
    assert read_documents(out).num_rows == len(records)  # the "train" split only


def test_hub_dataset_offline_is_one_clear_error(tmp_path):
    out = tmp_path / "docs.parquet"
    with pytest.raises(UserInputError) as err:
        ingest_corpus(CorpusConfig(path="hf:no-such-org/no-such-dataset:default"), out)
    message = str(err.value)
    assert "\n" not in message and "no-such-org/no-such-dataset" in message and "save_to_disk" in message
    assert not out.exists() and not out.with_name("ingest.json").exists()


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "csv"])
def test_undecodable_documents_are_skipped_and_counted(tmp_path, fmt):
    records = [{"text": r["text"], "domain": r["domain"]} for r in demo_records(3)]
    if fmt == "csv":
        import pandas as pd

        good = pd.DataFrame(records).to_csv(index=False).encode("utf-8")
        header, body = good.split(b"\n", 1)
        bad = b'"Two lines, the second \xff\xfe\nnot UTF-8 at all, but quoted",cooking\n'
        data = header + b"\n" + bad + body + b'"A quoted field\nwith a newline that decodes fine",astronomy\n'
        expected = len(records) + 1
    else:
        lines = [json.dumps(r).encode("utf-8") for r in records]
        bad = b'{"text": "Caf\xe9 in Latin-1 bytes, long enough to keep", "domain": "x"}'
        data = b"\n".join(lines[:2] + [bad] + lines[2:]) + b"\n"
        expected = len(records)
    path = tmp_path / f"c.{fmt}"
    path.write_bytes(gzip.compress(data) if fmt.endswith(".gz") else data)
    out = ingest_corpus(CorpusConfig(path=str(path)), tmp_path / "docs.parquet")
    assert read_documents(out).num_rows == expected
    counts = _counts(out)
    assert counts["undecodable"] == 1 and counts["kept"] == expected and counts["read"] == expected + 1
    assert not any("\ufffd" in t for t in read_documents(out).column("text").to_pylist())


@pytest.mark.parametrize("case", ["only_undecodable", "single_txt", "no_id_field"])
def test_more_bad_input_is_one_clear_error(tmp_path, case):
    path = tmp_path / "c.jsonl"
    cfg = {}
    if case == "only_undecodable":
        path.write_bytes(b'{"text": "\xff\xfe\xfd long enough but not UTF-8"}\n')
    elif case == "single_txt":
        path = tmp_path / "one.txt"
        path.write_text("one long enough document in a single file")
    else:
        write_jsonl(path, [{"text": "some long enough text here", "key": "a"}])
        cfg = {"id_field": "uid"}
    out = tmp_path / "out" / "docs.parquet"
    with pytest.raises(UserInputError) as err:
        ingest_corpus(CorpusConfig(path=str(path), **cfg), out)
    expected = {"only_undecodable": "empty after cleaning (1 documents with undecodable bytes, 0 malformed",
                "single_txt": "pass the directory of .txt files",
                "no_id_field": "no id field 'uid'; its fields are text, key"}[case]
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert not out.parent.exists() or not list(out.parent.iterdir())
