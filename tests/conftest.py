"""Shared fixtures: the embedded model and a tiny random Llama are loaded once per test session; results go to a temp store."""
from __future__ import annotations

import contextlib
import os
import socket

import pytest
import torch

import headlab as hl

# The tiny random Llama the contract tests run every scorer and ablation method on: grouped-query attention
# (4 query heads share 2 KV heads) like the real models, weights drawn wide enough (initializer_range 0.1)
# that attention is peaked and every head's ablation moves the logits well above float32 noise.
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, initializer_range=0.1)
TINY_LLAMA_NAME = "tiny-random-llama"


@pytest.fixture(scope="session", autouse=True)
def runs_store(tmp_path_factory):
    """Tests never write into the repository's cached_runs/: the store is a session temp folder."""
    previous = os.environ.get("HEADLAB_RUNS")
    os.environ["HEADLAB_RUNS"] = str(tmp_path_factory.mktemp("runs"))
    yield os.environ["HEADLAB_RUNS"]
    if previous is None:
        del os.environ["HEADLAB_RUNS"]
    else:
        os.environ["HEADLAB_RUNS"] = previous


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread while a module runs (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): small
    models on a shared 2-core machine run several times faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def lab() -> hl.Lab:
    return hl.load("embedded", device="cpu")


@pytest.fixture(scope="session")
def tiny_lab() -> hl.Lab:
    """A random 2-layer Llama (d_model 64, float32, CPU, seed 0) with the embedded model's tokenizer and vocabulary,
    booted into a `Lab` by `hl.from_model`, the way `hl.load` boots every model: prompts and chat templates work, and it builds in seconds."""
    from transformers import AutoTokenizer

    from headlab.loading import ensure_embedded_folder
    from headlab.runtime.benchmark import llama_8b_config, random_llama

    tokenizer = AutoTokenizer.from_pretrained(ensure_embedded_folder(), local_files_only=True)
    config = llama_8b_config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, attn_implementation="eager", **TINY_LLAMA)
    model = random_llama(config, device="cpu", dtype=torch.float32, seed=0)
    return hl.from_model(model, tokenizer, TINY_LLAMA_NAME)


@pytest.fixture(scope="session")
def induction_scores(lab) -> hl.HeadScores:
    return hl.score(lab, "induction")  # default parameters, as the app and CLI use


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def free_port() -> int:
    """A loopback port nothing listens on."""
    return _free_port()


@contextlib.contextmanager
def _served_app(lab: hl.Lab):
    """The web app on `lab`, served in-process on a free loopback port; yields its URL."""
    from app.main import launch

    port = _free_port()
    demo = launch(host="127.0.0.1", port=port, lab=lab, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture(scope="session")
def serve_app():
    """`with serve_app(lab) as url:` a separate app instance (for tests that change its model)."""
    return _served_app


@pytest.fixture(scope="session")
def app_url(lab):
    """One app on the session's model, shared by the API and browser tests."""
    with _served_app(lab) as url:
        yield url
