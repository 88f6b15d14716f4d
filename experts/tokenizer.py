"""The tokenizer every expert shares: byte-level BPE trained on the corpus, or the seed model's own."""
from __future__ import annotations

import logging
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from experts.config import SeedConfig
from ground.errors import UserInputError
from ground.files import atomic_dir

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"


def train_tokenizer(cfg: SeedConfig, corpus_path: Path, out_dir: Path) -> Path:
    """Write a `transformers` fast tokenizer to ``out_dir`` (atomically).

    For a ``preset:`` seed: byte-level BPE with ``cfg.vocab_size`` entries trained on the training split,
    with one special token ``<|endoftext|>`` used as document separator (bos = eos = pad).
    For a Hugging Face seed: that model's tokenizer, copied.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if cfg.preset is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        except Exception as exc:
            raise UserInputError(f"cannot load the tokenizer of seed {cfg.model!r} ({type(exc).__name__}): "
                                 "pass a local Hugging Face model directory as seed.model") from exc
        if tokenizer.eos_token is None:
            raise UserInputError(f"seed {cfg.model!r} has no eos token: experts need one to separate documents")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=_train_bpe(corpus_path, cfg.vocab_size),
                                            bos_token=EOS, eos_token=EOS, pad_token=EOS)
    with atomic_dir(out_dir) as tmp:
        tokenizer.save_pretrained(tmp)
    log.info("tokenizer: %s, %d entries", cfg.model if cfg.preset is None else "byte-level BPE", len(tokenizer))
    return out_dir


def _train_bpe(corpus_path: Path, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_train_text_batches(corpus_path), trainer=trainer)
    return tok


def _train_text_batches(corpus_path: Path, batch_rows: int = 4096):
    """Training-split texts in batches (lists of str) streamed from the corpus Parquet: memory stays bounded."""
    for batch in pq.ParquetFile(corpus_path).iter_batches(batch_size=batch_rows, columns=["text", "split"]):
        yield batch.filter(pc.equal(batch.column("split"), "train")).column("text").to_pylist()


def load_tokenizer(path: Path):
    """The tokenizer saved in ``path`` (a tokenizer or model directory)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def open_tokenizer(model_dir: Path):
    """The tokenizer of a seed or expert directory, with a one-line error saying how to get one."""
    if not Path(model_dir).is_dir():
        raise UserInputError(f"seed directory {model_dir} does not exist: build the seed first (cbtm run)")
    try:
        return load_tokenizer(model_dir)
    except Exception as exc:
        raise UserInputError(f"cannot load the tokenizer in {model_dir} ({type(exc).__name__}): "
                             "rebuild the seed") from exc
