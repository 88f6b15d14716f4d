"""Shared fixtures: hermetic environment, a small slice of the demo corpus, one real build of a tiny run."""
from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "demo" / "corpus.jsonl"
SLICE_DOMAINS = ("cooking", "astronomy", "football")

# Hermetic before anything imports Prefect or Hugging Face libraries.
_home = Path(tempfile.mkdtemp(prefix="cbtm-tests-"))
# Registered first, so it runs last: after Prefect's own exit handlers have stopped its server.
atexit.register(shutil.rmtree, _home, ignore_errors=True)
os.environ.setdefault("CBTM_CACHE", str(Path(os.environ.get("CBTM_TEST_CACHE", _home / "cache"))))
os.environ["PREFECT_HOME"] = str(_home / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "90"
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
os.environ["HF_DATASETS_CACHE"] = str(_home / "hf-datasets")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"


def demo_records(per_domain: int = 24, domains=SLICE_DOMAINS) -> list[dict]:
    """The first ``per_domain`` demo documents of each domain, in file order."""
    counts: Counter = Counter()
    out = []
    for line in DEMO.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec["domain"] in domains and counts[rec["domain"]] < per_domain:
            counts[rec["domain"]] += 1
            out.append(rec)
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def slice_corpus(tmp_path_factory) -> Path:
    """3 domains x 24 documents of the demo corpus as JSONL."""
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "slice.jsonl", demo_records())


def tiny_config(corpus: Path, n_clusters: int = 3):
    """The smallest config that still trains something: 3 clusters, a 'tiny' preset, 30 steps."""
    from flows.config import PipelineConfig

    return PipelineConfig().with_overrides([
        f'corpus.path="{corpus}"', f"cluster.n_clusters={n_clusters}", "seed.model=preset:tiny",
        "seed.vocab_size=512", "seed.max_position_embeddings=128", "train.steps=30", "train.batch_size=4",
        "train.block_size=32", "train.eval_every=15", "train.warmup_steps=3", "ensemble.route_window=16"])


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API server for the whole session, flow heartbeat off."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            yield


@pytest.fixture(scope="session")
def built_run(prefect_harness, slice_corpus, tmp_path_factory) -> Path:
    """A complete run directory built by the real `build` flow on the 3-domain slice."""
    from flows.pipeline import build

    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    build(tiny_config(slice_corpus).to_dict(), str(run_dir))
    return run_dir


@pytest.fixture(scope="session")
def baselined_run(built_run, tmp_path_factory) -> tuple[Path, str]:
    """A copy of the built run after its first `cbtm eval --baselines dense,random --limit 4`, with that command's
    stdout: the baselines are trained once for every test that needs them (copy it before writing to it)."""
    from flows.cli import main

    run = Path(shutil.copytree(built_run, tmp_path_factory.mktemp("baselined") / "run",
                               ignore=shutil.ignore_patterns("eval", "baselines")))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["eval", str(run), "--baselines", "dense,random", "--limit", "4"]) == 0
    return run, out.getvalue()
