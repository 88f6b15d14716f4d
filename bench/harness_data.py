"""Build the offline lm-evaluation-harness tasks of cbtm from labelled corpora: data + task YAMLs in one folder.

    python bench/harness_data.py --out runs/harness-tasks                     # every corpus of ../shared/data
    python bench/harness_data.py --out DIR --corpora 20newsgroups,ag_news --docs 200
    python bench/harness_data.py --out DIR --source demo=data/demo/corpus.jsonl:domain   # any JSONL with labels
    cbtm eval RUN --tasks cbtm_20newsgroups_topic,cbtm_20newsgroups_rolling --include-path runs/harness-tasks

Task data cannot be downloaded here, so the tasks read local JSON Lines (lm-eval's ``dataset_path: json``). Per
corpus NAME, from the templates in bench/harness/ (nothing of the corpora is copied into the project; the data
is written to ``--out``):

- ``cbtm_NAME_topic``: k-shot topic classification, the corpus's label names as the choices;
- ``cbtm_NAME_continuation``: the first words of a document and four continuations — its own next words and
  the same span of three documents with other labels;
- ``cbtm_NAME_rolling``: rolling log-likelihood of whole documents (word and byte perplexity, bits per byte).

Test items come from the corpus's test split (seeded sample of ``--docs``), few-shot examples from its train
split (or, for a corpus without one, from test documents not used as test items).
"""
from __future__ import annotations

import argparse
import gzip
import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
TEMPLATES = Path(__file__).resolve().parent / "harness"
KINDS = ("topic", "continuation", "rolling")
TOPIC_CHARS, CONTEXT_CHARS, SPAN_CHARS, ROLLING_CHARS = 400, 300, 120, 2000


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the data and the task YAMLs")
    p.add_argument("--corpora", default="20newsgroups,ag_news,bbc_news,dbpedia14_subset,brown,masc",
                   help="folders of ../shared/data (comma-separated; '' for none)")
    p.add_argument("--source", action="append", default=[], metavar="NAME=PATH[:LABEL_FIELD]",
                   help="another JSONL(.gz) corpus with a text and a label field (default label field: label); "
                   "split into test items and few-shot examples by a seeded shuffle")
    p.add_argument("--docs", type=int, default=300, help="test items per task (default: 300)")
    p.add_argument("--shots", type=int, default=100, help="few-shot pool per task (default: 100)")
    return p.parse_args(argv)


def _read(path: Path, label_field: str = "label") -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return [{"text": " ".join(r["text"].split()), "label": str(r[label_field])} for r in rows
            if r.get("text", "").strip() and r.get(label_field) not in (None, "")]


def _cut(text: str, chars: int) -> str:
    """At most ``chars`` characters, ending at a word boundary."""
    if len(text) <= chars:
        return text
    cut = text[:chars]
    return cut[:cut.rfind(" ")] if " " in cut else cut


def topic_items(rows: list[dict], labels: list[str]) -> list[dict]:
    choices = [f" {label}" for label in labels]
    return [{"text": _cut(r["text"], TOPIC_CHARS), "choices": choices, "label": labels.index(r["label"])}
            for r in rows]


def continuation_items(rows: list[dict], pool: list[dict], rng: random.Random) -> list[dict]:
    """Each row long enough: its first words, its next span and the same span of 3 rows of other labels."""
    def span(text: str) -> tuple[str, str] | None:
        context = _cut(text, CONTEXT_CHARS)
        rest = text[len(context):]
        nxt = _cut(rest.lstrip(), SPAN_CHARS)
        return (context, " " + nxt) if len(context) > 40 and len(nxt) > 40 else None

    spans = [(r["label"], s) for r in pool if (s := span(r["text"]))]
    out = []
    for r in rows:
        own = span(r["text"])
        others = [s for label, s in spans if label != r["label"]]
        if not own or len(others) < 3:
            continue
        choices = [own[1]] + [s[1] for s in rng.sample(others, 3)]
        order = list(range(4))
        rng.shuffle(order)
        out.append({"context": own[0], "choices": [choices[i] for i in order], "label": order.index(0)})
    return out


def _write(path: Path, items: list[dict]) -> None:
    path.write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items), encoding="utf-8")


def build(name: str, test: list[dict], shots: list[dict], out: Path, n_docs: int, n_shots: int) -> list[str]:
    """Write the three tasks of one corpus (data + YAML) into ``out``; returns the task names."""
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise SystemExit(f"corpus name {name!r} must be letters, digits and _ (it names the tasks)")
    rng = random.Random(0)
    test, shots = rng.sample(test, min(n_docs, len(test))), rng.sample(shots, min(n_shots, len(shots)))
    labels = sorted({r["label"] for r in test + shots})
    data = {"topic": (topic_items(test, labels), topic_items(shots, labels)),
            "continuation": (continuation_items(test, test + shots, rng), continuation_items(shots, shots, rng)),
            "rolling": ([{"text": _cut(r["text"], ROLLING_CHARS)} for r in test], None)}
    tasks = []
    for kind in KINDS:
        test_items, shot_items = data[kind]
        _write(out / f"{name}_{kind}.test.jsonl", test_items)
        if shot_items is not None:
            _write(out / f"{name}_{kind}.train.jsonl", shot_items)
        yaml = (TEMPLATES / f"{kind}.yaml").read_text().replace("@NAME@", name).replace("@DATA@", str(out.resolve()))
        (out / f"cbtm_{name}_{kind}.yaml").write_text(yaml)
        tasks.append(f"cbtm_{name}_{kind}")
        print(f"{tasks[-1]}: {len(test_items)} test items" + (f", {len(shot_items)} few-shot" if shot_items else ""))
    return tasks


def main(argv=None) -> None:
    args = _args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in [c for c in args.corpora.split(",") if c]:
        folder = SHARED / name
        if not (folder / "test.jsonl.gz").exists():
            print(f"skipped {name}: {folder / 'test.jsonl.gz'} not found")
            continue
        test = _read(folder / "test.jsonl.gz")
        if (folder / "train.jsonl.gz").exists():
            shots = _read(folder / "train.jsonl.gz")
        else:  # AG News has a test split only: few-shot examples from test documents not used as items
            random.Random(1).shuffle(test)
            test, shots = test[args.shots:], test[:args.shots]
        build(name, test, shots, args.out, args.docs, args.shots)
    for spec in args.source:
        name, _, rest = spec.partition("=")
        path, _, field = rest.partition(":")
        rows = _read(Path(path), field or "label")
        random.Random(1).shuffle(rows)
        cut = len(rows) // 2
        build(name, rows[:cut], rows[cut:], args.out, args.docs, args.shots)
    print(f"use: cbtm eval RUN --tasks TASK[,TASK...] --include-path {args.out}")


if __name__ == "__main__":
    main()
