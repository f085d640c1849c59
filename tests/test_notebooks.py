"""The teaching notebooks in notebooks/ run top to bottom in a fresh kernel, and each tells its story.

Each notebook is executed with nbclient in a kernel started from this interpreter (a kernel spec written
to a temp folder, so a `python3` spec elsewhere on the machine can't pick another Python), with
`$HEADLAB_RUNS` pointing at a temp folder: what a notebook computes never lands in cached_runs/.
Every notebook ends by defining `takeaway`, a dict of what it showed; the test appends one cell that
prints it as JSON and asserts on it.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402  (installed with nbclient)
from jupyter_client.manager import KernelManager  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
CELL_TIMEOUT = 300  # seconds per cell; whole notebooks take well under a minute on an idle laptop CPU
KERNEL = "headlab-test"
DUMP = "import json\nprint('TAKEAWAY ' + json.dumps(takeaway, default=str))"


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory) -> KernelSpecManager:
    """A kernel spec that runs ipykernel in this very interpreter (the venv's Python)."""
    folder = tmp_path_factory.mktemp("kernels") / KERNEL
    folder.mkdir()
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "headlab tests", "language": "python"}
    (folder / "kernel.json").write_text(json.dumps(spec))
    return KernelSpecManager(kernel_dirs=[str(folder.parent)])


def run_notebook(nb, kernel_specs: KernelSpecManager, runs: Path, cwd: Path) -> list[str]:
    """Execute `nb` in place (fresh kernel, top to bottom); return each code cell's printed text."""
    km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=kernel_specs)
    client = nbclient.NotebookClient(nb, km=km, timeout=CELL_TIMEOUT, allow_errors=False,
                                     resources={"metadata": {"path": str(cwd)}})
    client.execute(env={**os.environ, "HEADLAB_RUNS": str(runs)})
    return ["".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")
            for cell in nb.cells if cell.cell_type == "code"]


def takeaway_of(path: Path, kernel_specs, tmp_path) -> dict:
    """Run the notebook at `path` with a last cell that prints its `takeaway` dict; return that dict."""
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(DUMP))
    runs = tmp_path / "runs"
    texts = run_notebook(nb, kernel_specs, runs, path.parent)
    line = next(l for l in texts[-1].splitlines() if l.startswith("TAKEAWAY "))
    return json.loads(line[len("TAKEAWAY "):])


def test_four_notebooks_ship_without_outputs():
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert [p.name[0] for p in paths] == ["1", "2", "3", "4"]
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{path.name} ships outputs"
        assert "Exercise" in "".join(c.source for c in nb.cells if c.cell_type == "markdown")
        code = "".join(c.source for c in nb.cells if c.cell_type == "code")
        assert "import headlab as hl" in code and "headlab._" not in code and "._" not in code.replace("__", "")


def test_kernel_is_this_python(kernel_specs, tmp_path):
    """The notebooks run on the interpreter that runs the tests (the venv), with the test's results folder."""
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell("import os, sys\nprint(sys.executable)\nprint(os.environ['HEADLAB_RUNS'])"))
    out = run_notebook(nb, kernel_specs, tmp_path / "runs", tmp_path)[0].split()
    assert out == [sys.executable, str(tmp_path / "runs")]


def test_induction_notebook(kernel_specs, tmp_path):
    t = takeaway_of(NOTEBOOKS / "1_induction_heads.ipynb", kernel_specs, tmp_path)
    assert t["top_induction_head"] == "L18H6"
    assert t["previous_token_partner"] == "L16H0"
    assert t["top8_loss"] > t["random8_loss_max"] + 5  # the top-8 induction heads break copying, random 8 don't
    assert t["partner_ablated_loss"] > t["intact_loss"] + 3  # the previous-token partner alone hurts


def test_retrieval_notebook(kernel_specs, tmp_path):
    t = takeaway_of(NOTEBOOKS / "2_retrieval_heads_and_kv.ipynb", kernel_specs, tmp_path)
    acc, kl, kv = t["needle_accuracy"], t["kl_vs_full"], t["kv_bytes"]
    assert t["top_retrieval_head"] == "L18H6"
    assert acc["full cache"] == 1.0 and acc["retrieval 50%"] == 1.0  # the scored mask keeps the needle
    assert acc["random 50%"] == 0.0  # the same budget spent at random loses it
    assert 0 < kl["retrieval 50%"] < kl["random 50%"]
    assert kv["retrieval 50%"] < 0.8 * kv["full"]  # the runtime really holds fewer bytes


def test_sinks_notebook(kernel_specs, tmp_path):
    t = takeaway_of(NOTEBOOKS / "3_sinks_and_dormant_heads.ipynb", kernel_specs, tmp_path)
    assert set(t["n_dormant"]) == {"prose", "code", "random", "repeated", "chat"}
    assert min(t["n_dormant"].values()) > 0 and t["n_switching"] > 0
    assert 5 <= t["sink_from_layer"] <= 20
    assert "prose" in t["L24H2_dormant_on"] and "random" not in t["L24H2_dormant_on"]


def test_channel_notebook(kernel_specs, tmp_path):
    t = takeaway_of(NOTEBOOKS / "4_svd_channel.ipynb", kernel_specs, tmp_path)
    assert t["channel"].startswith("L16H0")
    assert t["directions_for_90pct"] < 32  # of 128: a low-rank channel
    # removing the channel breaks induction nearly as much as the whole head; random subspaces don't
    assert t["channel_removed_loss"] > t["random_removed_max_loss"] + 2
    assert t["channel_removed_loss"] > t["intact_loss"] + 3
