"""A corpus directory whose files name splits is read as `datasets` reads it: never train on its test file."""
import logging
from pathlib import Path

import pytest

from cluster.config import CorpusConfig
from cluster.corpus import ingest_corpus, read_documents
from cluster.splits import SPLIT_KEYWORDS, split_of
from flows.evaluate import heldout_texts
from ground.errors import UserInputError
from tests.conftest import demo_records, write_jsonl

NAMES = ["train.jsonl.gz", "test.jsonl.gz", "20ng-train.jsonl", "data_test.csv", "train-00000-of-00002.parquet",
         "dev.jsonl", "valid.csv", "val_1.jsonl", "evaluation.jsonl", "eval.jsonl", "training.jsonl",
         "testing.jsonl", "corpus.jsonl", "contest.jsonl", "retrain.jsonl", "interval.jsonl", "evaluate.jsonl"]


def test_the_keywords_are_those_of_datasets():
    from datasets.data_files import SPLIT_KEYWORDS as theirs

    assert {str(split): tuple(words) for split, words in theirs.items()} == SPLIT_KEYWORDS


@pytest.mark.parametrize("name", NAMES)
def test_a_file_name_names_the_split_datasets_gives_it(tmp_path, name):
    from datasets.data_files import DataFilesDict, get_data_patterns

    (tmp_path / name).write_text("{}\n")
    patterns = get_data_patterns(str(tmp_path))
    if list(patterns) == ["train"] and patterns["train"] == ["**"]:
        expected = None  # datasets found no split name: the whole directory is its train split
    else:
        files = DataFilesDict.from_patterns(patterns, base_path=str(tmp_path))
        expected = next(str(split) for split, found in files.items() if found)
    assert split_of(Path(name)) == expected


def test_top_folders_name_the_split_of_txt_files():
    assert split_of(Path("test/pos/1.txt")) == "test"
    assert split_of(Path("imdb-train/neg/2.txt")) == "train"
    assert split_of(Path("law/3.txt")) is None
    assert split_of(Path("law/test/3.txt")) is None  # a folder deeper down is a topic, not a split


def _split_corpus(root: Path) -> tuple[list[dict], list[dict]]:
    records = demo_records(6)
    train, test = records[::2], records[1::2]
    write_jsonl(root / "train.jsonl", train)
    write_jsonl(root / "test.jsonl", test)
    return train, test


def test_ingest_reads_the_train_split_and_says_so(tmp_path, caplog):
    train, _ = _split_corpus(tmp_path / "corpus")
    with caplog.at_level(logging.INFO, logger="cluster.splits"):
        out = ingest_corpus(CorpusConfig(path=str(tmp_path / "corpus")), tmp_path / "docs.parquet")
    assert sorted(read_documents(out).column("text").to_pylist()) == sorted(r["text"] for r in train)
    said = [r.getMessage() for r in caplog.records if r.name == "cluster.splits"]
    assert len(said) == 1 and "train split (train.jsonl)" in said[0] and "left out: test.jsonl" in said[0]


def test_eval_of_a_directory_reads_its_test_split(tmp_path):
    _, test = _split_corpus(tmp_path / "corpus")
    assert sorted(heldout_texts(None, tmp_path / "corpus")) == sorted(r["text"].strip() for r in test)


def test_txt_folders_named_by_split(tmp_path):
    records = demo_records(2)
    for i, rec in enumerate(records):
        path = tmp_path / "txt" / ("train" if i % 2 else "test") / rec["domain"] / f"{i}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rec["text"], encoding="utf-8")
    out = ingest_corpus(CorpusConfig(path=str(tmp_path / "txt")), tmp_path / "docs.parquet")
    assert sorted(read_documents(out).column("id").to_pylist()) == sorted(
        f"train/{r['domain']}/{i}.txt" for i, r in enumerate(records) if i % 2)


def test_a_directory_without_the_split_asked_for_is_one_clear_error(tmp_path):
    write_jsonl(tmp_path / "corpus" / "test.jsonl", demo_records(2))
    with pytest.raises(UserInputError, match=r"names its files by split \(test\) but none holds the train split"):
        ingest_corpus(CorpusConfig(path=str(tmp_path / "corpus")), tmp_path / "docs.parquet")
    assert not (tmp_path / "docs.parquet").exists()
    write_jsonl(tmp_path / "only_train" / "train.jsonl", demo_records(2))
    with pytest.raises(UserInputError, match=r"\(train\) but none holds the test split: pass the file"):
        heldout_texts(None, tmp_path / "only_train")


def test_files_that_name_no_split_are_the_training_files_beside_a_test_file(tmp_path):
    records = demo_records(4)
    write_jsonl(tmp_path / "corpus" / "corpus.jsonl", records[::2])
    write_jsonl(tmp_path / "corpus" / "test.jsonl", records[1::2])
    out = ingest_corpus(CorpusConfig(path=str(tmp_path / "corpus")), tmp_path / "docs.parquet")
    assert sorted(read_documents(out).column("text").to_pylist()) == sorted(r["text"] for r in records[::2])
    assert sorted(heldout_texts(None, tmp_path / "corpus")) == sorted(r["text"].strip() for r in records[1::2])


def test_a_directory_that_names_no_split_is_read_whole(tmp_path):
    records = demo_records(4)
    write_jsonl(tmp_path / "corpus" / "a.jsonl", records[:10])
    write_jsonl(tmp_path / "corpus" / "b.jsonl", records[10:])
    out = ingest_corpus(CorpusConfig(path=str(tmp_path / "corpus")), tmp_path / "docs.parquet")
    assert read_documents(out).num_rows == len(records)
