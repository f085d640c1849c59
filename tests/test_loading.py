"""Loading: the embedded GGUF, its safetensors cache, a local folder, and plain errors.

Local folders are keyed by path and files (never by folder name alone), and a folder asking for its own code never
runs it, nor asks on stdin, unless `trust_remote_code=True`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import transformers

import headlab as hl
from headlab import loading

TEXT = "The lighthouse keeper climbed the stairs to light the lamp."


def test_embedded_model_info(lab):
    info = lab.info
    assert (info.n_layers, info.n_heads, info.n_kv_heads, info.d_head, info.n_ctx) == (30, 9, 3, 64, 8192)
    assert info.name == "SmolLM2-135M-Instruct"
    assert info.slug == "smollm2-135m-instruct"
    # The model is a real language model: it continues a common phrase correctly.
    tokens = lab.to_tokens("The capital of France is")
    assert lab.tokenizer.decode(lab.model(tokens)[0, -1].argmax()).strip() == "Paris"


def test_first_load_dequantizes_once_then_reads_the_cache(lab, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_CACHE", str(tmp_path))
    calls = []
    original = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(kwargs.get("gguf_file"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    first = hl.load("embedded", device="cpu")
    folder = loading.embedded_folder()
    assert folder.is_relative_to(tmp_path)
    assert (folder / "model.safetensors").stat().st_size > 400e6
    assert calls[0] is not None, "the first load must read the GGUF"
    calls.clear()
    second = hl.load("embedded", device="cpu")
    assert all(c is None for c in calls), "a cached load must not touch the GGUF"
    tokens = lab.to_tokens(TEXT)
    torch.testing.assert_close(second.model(tokens), lab.model(tokens))
    torch.testing.assert_close(first.model(tokens), lab.model(tokens))


def test_local_folder_takes_the_boot_transformers_path(lab, tmp_path):
    # A plain transformers folder (config.json + safetensors + tokenizer) made from the embedded weights.
    folder = tmp_path / "my-smollm"
    shutil.copytree(loading.embedded_folder(), folder)
    other = hl.load(str(folder), device="cpu")
    assert other.info.name == "my-smollm" and other.info.n_layers == 30
    assert other.info.slug == f"my-smollm-{loading.folder_fingerprint(folder)[:10]}"
    tokens = lab.to_tokens(TEXT)
    torch.testing.assert_close(other.model(tokens), lab.model(tokens))


def test_unreachable_hub_name_fails_fast_and_plainly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the failure is the offline path's, not this machine's lack of network
    with pytest.raises(hl.ModelLoadError, match="cannot be reached"):
        hl.load("no-such-org/no-such-model", device="cpu")


def test_bad_folder_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hl.ModelLoadError, match="config.json"):
        hl.load(str(tmp_path), device="cpu")
    with pytest.raises(hl.ModelLoadError, match="no such directory"):
        hl.load(str(tmp_path / "missing"), device="cpu")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(hl.ModelLoadError, match="Could not read .*config.json"):
        hl.load(str(tmp_path), device="cpu")


def test_prompt_longer_than_context_is_refused(lab):
    with pytest.raises(hl.PromptTooLongError, match="8192"):
        lab.to_tokens("word " * 9000)


def test_chat_template(lab):
    prompt = lab.chat("What is 2 + 2?")
    assert "What is 2 + 2?" in prompt and prompt.rstrip().endswith("<|im_start|>assistant")


# --- local folders are keyed by path and files ------------------------------------------------------------------


def _save_tiny(folder, tiny_lab, seed: int):
    """A random tiny Llama (the `tiny_lab` shape, weights drawn with `seed`) saved with save_pretrained into `folder`."""
    from headlab.runtime.benchmark import random_llama

    random_llama(tiny_lab.hf_model.config, device="cpu", dtype=torch.float32, seed=seed).save_pretrained(folder)
    tiny_lab.tokenizer.save_pretrained(folder)
    return folder


def test_two_folders_called_model_never_share_stored_scores(tiny_lab, tmp_path):
    a = hl.load(str(_save_tiny(tmp_path / "a" / "model", tiny_lab, seed=1)), device="cpu")
    b = hl.load(str(_save_tiny(tmp_path / "b" / "model", tiny_lab, seed=2)), device="cpu")
    assert a.info.name == b.info.name == "model"
    assert a.info.slug != b.info.slug and a.info.slug.startswith("model-") and b.info.slug.startswith("model-")
    scores_a = hl.score(a, "induction", n=2, seq_len=12)
    assert hl.stored(b, "induction", n=2, seq_len=12) is None, "b must not read a's stored scores"
    scores_b = hl.score(b, "induction", n=2, seq_len=12)
    assert not torch.equal(scores_a.values, scores_b.values)  # computed on b's own weights
    again = hl.load(str(tmp_path / "a" / "model"), device="cpu")
    assert again.info.slug == a.info.slug, "the same folder loaded twice keeps its slug"
    torch.testing.assert_close(hl.stored(again, "induction", n=2, seq_len=12).values, scores_a.values)


def test_new_weights_saved_into_the_same_folder_get_a_new_slug(tiny_lab, tmp_path):
    folder = _save_tiny(tmp_path / "model", tiny_lab, seed=1)
    before = hl.load(str(folder), device="cpu")
    hl.score(before, "induction", n=2, seq_len=12)
    after = hl.load(str(_save_tiny(folder, tiny_lab, seed=2)), device="cpu")  # same names and sizes, new weights
    assert after.info.slug != before.info.slug
    assert hl.stored(after, "induction", n=2, seq_len=12) is None


def test_embedded_and_in_memory_models_keep_their_names_as_slugs(lab, tiny_lab):
    # The shipped runs live under these folders: a fingerprint here would orphan them.
    assert lab.info.fingerprint is None and lab.info.slug == "smollm2-135m-instruct"
    assert tiny_lab.info.fingerprint is None and tiny_lab.info.slug == "tiny-random-llama"


# --- a model's own code never runs unless asked -----------------------------------------------------------------

CUSTOM_CODE = """
import pathlib
pathlib.Path({marker!r}).write_text("custom code ran")
from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    model_type = "evil-llama"


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
"""

LOAD_SCRIPT = """
import sys
import headlab as hl
try:
    hl.load(sys.argv[1], device="cpu", trust_remote_code=sys.argv[2] == "trust")
except hl.ModelLoadError as err:
    print("ModelLoadError:", err)
    sys.exit(3)
print("loaded")
"""


def _custom_code_folder(tiny_lab, tmp_path, model_type: str = "evil-llama"):
    """A tiny model folder whose config.json asks for `evil.py`, which writes a marker file when imported."""
    folder = _save_tiny(tmp_path / "custom", tiny_lab, seed=1)
    marker = tmp_path / "marker.txt"
    (folder / "evil.py").write_text(textwrap.dedent(CUSTOM_CODE.format(marker=str(marker))))
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder, marker


def _load_in_subprocess(folder, trust: bool, tmp_path) -> subprocess.CompletedProcess:
    """`hl.load(folder)` in a fresh Python with stdin closed (a prompt would read EOF) and a timeout (or hang)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    return subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(folder), "trust" if trust else "no"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300, env=env)


def test_custom_code_fails_at_once_without_asking_or_running(tiny_lab, tmp_path):
    folder, marker = _custom_code_folder(tiny_lab, tmp_path)
    result = _load_in_subprocess(folder, trust=False, tmp_path=tmp_path)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "needs custom code" in result.stdout and "trust_remote_code=True" in result.stdout
    assert "[y/N]" not in result.stdout + result.stderr, "nothing may be asked on stdin"
    assert not marker.exists(), "the folder's Python must not run"
    # In-process too: refused before transformers is asked, so no prompt could be reached.
    with pytest.raises(hl.ModelLoadError, match="needs custom code"):
        hl.load(str(folder), device="cpu")
    assert not marker.exists()


def test_custom_code_runs_only_with_the_explicit_opt_in(tiny_lab, tmp_path):
    # The other half of the test above: the marker is a real detector, written as soon as the folder's code runs.
    folder, marker = _custom_code_folder(tiny_lab, tmp_path)
    result = _load_in_subprocess(folder, trust=True, tmp_path=tmp_path)
    assert marker.exists(), result.stdout + result.stderr
    assert result.returncode == 0 and result.stdout.strip().endswith("loaded"), result.stdout + result.stderr
    assert "[y/N]" not in result.stdout + result.stderr, "opting in once is enough: nothing is asked again"


def test_a_known_model_type_with_a_leftover_auto_map_loads_with_transformers_own_code(tiny_lab, tmp_path, monkeypatch):
    # Hub checkpoints of natively supported models often keep an auto_map: refusing them would push users to opt in to
    # code they do not need. They load with transformers' classes, and the folder's code stays unrun.
    folder, marker = _custom_code_folder(tiny_lab, tmp_path, model_type="llama")
    monkeypatch.setattr("builtins.input", lambda *args: pytest.fail("asked on stdin"))
    loaded = hl.load(str(folder), device="cpu")
    assert loaded.info.architecture == "LlamaForCausalLM" and not marker.exists()


def test_a_killed_first_load_leaves_no_staging_folder_behind(tmp_path):
    """A first load killed mid-write leaves `<model>.<random>/` (a partial model copy); the next first load sweeps it."""
    from headlab.loading import sweep_staging

    folder = tmp_path / "models" / "SmolLM2-135M-Instruct-q8"
    stale, fresh = folder.parent / f"{folder.name}.abc123", folder.parent / f"{folder.name}.def456"
    for staging in (stale, fresh):
        staging.mkdir(parents=True)
        (staging / "model.safetensors").write_bytes(b"\0" * 1024)
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    (folder.parent / "other-model.xyz").mkdir()
    assert sweep_staging(folder) == [stale]
    assert not stale.exists() and fresh.exists()  # a recent one may be another process's load in progress
    assert (folder.parent / "other-model.xyz").exists()
