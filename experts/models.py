"""Loading causal LMs: `from_pretrained` under `ground.loading.model_loading` (one at a time, quietly)."""
from __future__ import annotations

from pathlib import Path

from ground.errors import UserInputError
from ground.files import read_json
from ground.loading import model_loading


def load_causal_lm(name_or_path: str | Path, **kwargs):
    """`AutoModelForCausalLM.from_pretrained`, one load at a time in the process, with a one-line error for a
    path that is not a causal LM."""
    from transformers import AutoModelForCausalLM

    path = Path(name_or_path)
    if (path.is_absolute() or str(name_or_path).startswith(".")) and not path.exists():
        raise UserInputError(f"model {name_or_path} does not exist: pass a Hugging Face causal LM directory")
    try:
        with model_loading():
            return AutoModelForCausalLM.from_pretrained(str(name_or_path), **kwargs)
    except Exception as exc:
        raise UserInputError(f"cannot load {name_or_path} as a causal LM ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from exc


def read_vocab_size(model_dir: Path) -> int:
    """``vocab_size`` from a model directory's config.json; UserInputError if it is not a model directory."""
    try:
        return int(read_json(Path(model_dir) / "config.json")["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserInputError(f"{model_dir} is not a trained model directory (no readable config.json): "
                             "retrain from the seed instead") from exc
