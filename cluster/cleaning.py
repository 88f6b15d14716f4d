"""Reading corpus files byte by byte before `datasets` does: documents that cannot be read are skipped and
counted, never fatal, and a file that cannot be read at all is named in one line.

- undecodable bytes (not UTF-8): that JSONL line, CSV record or .txt file is dropped;
- malformed JSON Lines (not a JSON object): that line is dropped; the first ones are named (file:line);
- a truncated or damaged gzip file: an error naming the file.

A cleaned file is a copy in a temporary directory; the source is never modified.
"""
from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from ground.errors import UserInputError


@dataclass
class Dropped:
    """Documents skipped while reading: ``undecodable`` (bytes that are not UTF-8), ``malformed`` (JSON lines
    that are not objects), and where the first malformed ones were (``file:line``)."""

    undecodable: int = 0
    malformed: int = 0
    examples: list = field(default_factory=list)

    def add(self, other: "Dropped") -> None:
        self.undecodable += other.undecodable
        self.malformed += other.malformed
        self.examples = (self.examples + other.examples)[:3]


def open_bytes(path: Path):
    return gzip.open(path, "rb") if str(path).lower().endswith(".gz") else open(path, "rb")


def _damaged(path: Path, exc: Exception) -> UserInputError:
    return UserInputError(f"corpus file {path} is truncated or damaged ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:120]}): re-create or re-download it")


def is_utf8(path: Path) -> bool:
    """Stream the (decompressed) bytes through a UTF-8 decoder: O(1) memory. A damaged gzip file is an error."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open_bytes(path) as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise _damaged(path, exc) from exc
    return True


def decodable_copies(builder: str, files: list[str], tmp: Path, check_json: bool = False) -> tuple[list[str], Dropped]:
    """Files as they are when they read cleanly; otherwise a copy in ``tmp`` without the documents that cannot
    be read (``check_json``: also JSON lines that are not objects). Returns (files to read, what was dropped)."""
    out, dropped = [], Dropped()
    for i, name in enumerate(files):
        if builder == "parquet" or (not check_json and is_utf8(Path(name))):
            out.append(name)
            continue
        dst = tmp / f"{i:05d}.{'jsonl' if builder == 'json' else 'csv'}"
        dropped.add(clean_jsonl(Path(name), dst) if builder == "json" else clean_csv(Path(name), dst))
        out.append(str(dst))
    return out, dropped


def clean_jsonl(src: Path, dst: Path) -> Dropped:
    """Copy the lines of ``src`` that decode as UTF-8 and parse as JSON objects (blank lines are skipped)."""
    dropped = Dropped()
    try:
        with open_bytes(src) as fin, open(dst, "wb") as fout:
            for number, line in enumerate(fin, start=1):
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError:
                    dropped.undecodable += 1
                    continue
                if not text.strip():
                    continue
                try:
                    ok = isinstance(json.loads(text), dict)
                except ValueError:
                    ok = False
                if not ok:
                    dropped.malformed += 1
                    if len(dropped.examples) < 3:
                        dropped.examples.append(f"{src}:{number}")
                    continue
                fout.write(line if line.endswith(b"\n") else line + b"\n")
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise _damaged(src, exc) from exc
    return dropped


def clean_csv(src: Path, dst: Path) -> Dropped:
    """Copy CSV records whose fields all decode (quoted newlines are handled by the csv module)."""
    csv.field_size_limit(max(csv.field_size_limit(), min(sys.maxsize, 2**31 - 1)))
    dropped = Dropped()
    try:
        with open_bytes(src) as raw, open(dst, "w", encoding="utf-8", newline="") as fout:
            reader = csv.reader(io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline=""))
            writer = csv.writer(fout)
            for n, row in enumerate(reader):
                try:
                    "\x1f".join(row).encode("utf-8")
                except UnicodeEncodeError:
                    if n == 0:
                        raise UserInputError(f"corpus {src}: its CSV header is not UTF-8: re-encode the file as UTF-8")
                    dropped.undecodable += 1
                    continue
                writer.writerow(row)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise _damaged(src, exc) from exc
    return dropped


def txt_to_jsonl(files: list[str], root: Path, dst: Path) -> tuple[list[str], Dropped]:
    """One JSON line {"path": relative path, "text": contents} per decodable .txt file."""
    dropped = Dropped()
    with open(dst, "w", encoding="utf-8") as out:
        for name in files:
            try:
                text = Path(name).read_bytes().decode("utf-8-sig")
            except UnicodeDecodeError:
                dropped.undecodable += 1
                continue
            rel = Path(name).relative_to(root).as_posix()
            out.write(json.dumps({"path": rel, "text": text}, ensure_ascii=False) + "\n")
    return [str(dst)], dropped
