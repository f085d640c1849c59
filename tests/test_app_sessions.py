"""The app shared by several visitors (driven through its API with gradio_client, one client per visitor): each
has their own model from one pool, stored results are read while a job runs, Cancel stops a job, masks upload."""
import socket
import threading
import time
import zipfile

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from app.main import launch
from app.pool import ModelPool, model_bytes
from app.runtime_tab import SOURCES
from headlab.scorers import make_scorer

PROMPT = "The cat sat on the mat. The cat sat on the mat."
FIRST_VIEW_SECONDS = 5
LONG_JOB = ("induction", 512, 7, True)  # /score: 512 samples recomputed, a minute or more on this CPU


def layers(facts: dict) -> str:
    """The layer count in the Model tab's table of the model's facts."""
    return next(value for fact, value in facts["data"] if fact == "layers")


@pytest.fixture(scope="module")
def two_model_app(lab, tiny_lab):
    """An app whose pool holds the embedded model (every visitor's first) and the tiny random Llama."""
    pool = ModelPool()
    pool.add(tiny_lab.info.name, tiny_lab)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    demo = launch(port=port, lab=lab, pool=pool, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", pool
    finally:
        demo.close()


def test_two_visitors_work_on_their_own_models_at_once(two_model_app, tiny_lab):
    url, pool = two_model_app
    ada, bob = Client(url, verbose=False), Client(url, verbose=False)
    status, info = ada.predict(tiny_lab.info.name, api_name="/load_model")
    assert layers(info) == "2" and "Your model is now" in status
    assert layers(bob.predict(api_name="/model_info")[1]) == "30"  # Bob still has the embedded model
    # At the same time: Ada's ablation runs on the tiny model, Bob's on the embedded one.
    jobs = {name: client.submit("L1H0", "repeated_tokens", "mean", 2, api_name="/ablate") for name, client in (("ada", ada), ("bob", bob))}
    ada_summary, bob_summary = (jobs[name].result(timeout=300)[0] for name in ("ada", "bob"))
    assert tiny_lab.info.name in ada_summary and "SmolLM2" in bob_summary
    with pytest.raises(AppError, match="layers 0-1"):
        ada.predict(PROMPT, "L18H6", api_name="/pattern")
    assert "circuits-vis" in bob.predict(PROMPT, "L18H6", api_name="/pattern")
    assert sorted(pool.keys()) == sorted(["embedded", tiny_lab.info.name])  # one copy of each model


def test_a_first_view_arrives_while_a_job_runs_and_cancel_stops_the_job(two_model_app, lab):
    url, _ = two_model_app
    runner, reader = Client(url, verbose=False), Client(url, verbose=False)
    job = runner.submit(*LONG_JOB, api_name="/score")
    deadline = time.monotonic() + 60
    while "forward passes" not in str(job.status().progress_data) and time.monotonic() < deadline:
        time.sleep(0.2)  # the job is computing and reports its forward passes
    assert "forward passes" in str(job.status().progress_data)
    started = time.monotonic()
    _, _, _, status, _, _, head, _, _ = reader.predict(api_name="/first_atlas")
    assert time.monotonic() - started < FIRST_VIEW_SECONDS and "read from the store" in status and head == "L18H6"
    runner.predict(api_name="/cancel")
    with pytest.raises(Exception, match="Cancel"):
        job.result(timeout=60)
    cancelled = time.monotonic()
    assert runner.predict(PROMPT, "L18H6", api_name="/pattern").startswith("<iframe")  # the model is free again ...
    assert time.monotonic() - cancelled < 20  # ... at once: the job stopped at its next forward pass, not minutes later
    assert not make_scorer("induction", n=512, seed=7).run_path(lab).exists()  # nothing stored from the cancelled run


def test_a_mask_downloaded_from_the_app_uploads_back_and_a_bad_zip_is_refused(two_model_app, tmp_path):
    url, _ = two_model_app
    client = Client(url, verbose=False)
    form = (list(SOURCES)[0], "retrieval", 0.5, 64, 256)
    status, _, _, json_path, duo_zip = client.predict(*form, api_name="/export_mask")
    # Uploaded, the mask replaces the form (here: a form asking for all-streaming heads).
    streaming = (list(SOURCES)[2], "retrieval", 0.5, 64, 256)
    for upload in (json_path, duo_zip):
        again, *_ = client.predict(*streaming, handle_file(upload), api_name="/export_mask")
        assert "uploaded mask" in again and "45/90 KV heads full" in again
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("../full_attention_heads.tsv", "1\t1\t1\n")
    with pytest.raises(AppError, match="leaves its folder"):
        client.predict(*streaming, handle_file(str(evil)), api_name="/export_mask")
    foreign = tmp_path / "tiny.json"
    foreign.write_text(open(json_path).read().replace('"n_layers": 30', '"n_layers": 2'))
    with pytest.raises(AppError):
        client.predict(*streaming, handle_file(str(foreign)), api_name="/export_mask")


def test_the_pool_loads_a_name_once_and_evicts_the_least_recently_used_idle_model(lab, tiny_lab):
    loads = []

    def loader(name: str):
        time.sleep(0.2)  # a slow load: two visitors asking at once must share it
        loads.append(name)
        return tiny_lab

    tiny = model_bytes(tiny_lab)
    pool = ModelPool(budget_bytes=model_bytes(lab) + 2 * tiny, loader=loader)
    pool.add("embedded", lab, pinned=True)
    threads = [threading.Thread(target=pool.get, args=("tiny-a",)) for _ in range(3)]
    [thread.start() for thread in threads]
    [thread.join() for thread in threads]
    assert loads == ["tiny-a"]  # one copy per name
    pool.get("tiny-b")
    pool.get("tiny-a")  # tiny-a used last: tiny-b is now the least recently used
    with pool.get("tiny-a").lock:  # a job runs on tiny-a: it may not be unloaded under it
        pool.get("tiny-c")
    assert pool.keys() == ["embedded", "tiny-a", "tiny-c"] and pool.held_bytes() <= pool.budget_bytes
    pool.budget_bytes = 0  # over budget: every idle unpinned model goes but the newest; the launch model stays
    pool.get("tiny-d")
    assert pool.keys() == ["embedded", "tiny-d"]
