"""The headlab web app: one tab per question (Model, Head atlas, Ablate, Retrieval, Sinks, Successor,
Select & copy, Safety, Channels, Export & runtime) on one shared model, one job at a time.

    from app.main import launch
    launch(host="127.0.0.1", port=7860)          # loads the embedded model first

`build_app(lab)` returns the `gr.Blocks` (queue configured) without serving it.

Served beyond this machine (`host` not loopback, or `share=True`) the app must be asked for with
`allow_remote=True`: whoever reaches it can run jobs on the model, load Hugging Face models onto the
server and read the files of `files_dir` (`app.inputs.FileAccess`); `auth=(user, password)` puts
Gradio's login in front of it.
"""
import sys
from pathlib import Path

import gradio as gr

import headlab as hl
from headlab import validate
from app.ablate_tab import build_ablate_tab
from app.atlas_tab import build_atlas_tab
from app.channels_tab import build_channels_tab
from app.inputs import FileAccess
from app.model_tab import build_model_tab, current_model
from app.retrieval_tab import build_retrieval_tab
from app.runtime_tab import build_runtime_tab
from app.safety_tab import build_safety_tab
from app.select_copy_tab import build_select_copy_tab
from app.sinks_tab import build_sinks_tab
from app.successor_tab import build_successor_tab
from app.workbench import Workbench

# Every event that touches the model shares this concurrency group: the model's hooks are global
# state, so two jobs must never run on it at once.
LAB_JOBS = "lab"
TITLE = "headlab — attention-head workbench"
# The tabs after Ablate, each built from the workbench alone: (label, id, build function).
MODEL_TABS = [
    ("Retrieval", "retrieval", build_retrieval_tab),
    ("Sinks", "sinks", build_sinks_tab),
    ("Successor", "successor", build_successor_tab),
    ("Select & copy", "select_copy", build_select_copy_tab),
    ("Safety", "safety", build_safety_tab),
    ("Channels", "channels", build_channels_tab),
    ("Export & runtime", "runtime", build_runtime_tab),
]


def build_app(lab: hl.Lab | None = None, files: FileAccess | None = None) -> gr.Blocks:
    """The app's Blocks, working on `lab` (default: load the embedded model now), reading the server
    files `files` allows (default: uploads only, local model folders anywhere: one user on loopback)."""
    bench = Workbench(lab if lab is not None else hl.load("embedded"), files)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"# {TITLE}\nWhat does each attention head do, and which ones can we cut?")
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Model", id="model", elem_id="tab-model"):
                model = build_model_tab(bench, LAB_JOBS)
            with gr.Tab("Head atlas", id="atlas", elem_id="tab-atlas"):
                atlas = build_atlas_tab(bench, LAB_JOBS)
            with gr.Tab("Ablate", id="ablate", elem_id="tab-ablate"):
                build_ablate_tab(bench, atlas, LAB_JOBS)
            for label, tab_id, build_tab in MODEL_TABS:
                with gr.Tab(label, id=tab_id, elem_id=f"tab-{tab_id.replace('_', '-')}"):
                    build_tab(bench, LAB_JOBS)

        # A new model invalidates the atlas: show that model's stored run of the chosen kind, if any.
        model.loaded.change(
            atlas.show_stored, inputs=atlas.stored_inputs, outputs=atlas.stored_outputs,
            api_visibility="private", concurrency_id=LAB_JOBS,
        )
        # Every page load shows the current model and the stored atlas, computing nothing.
        demo.load(lambda: current_model(bench), outputs=[model.status, model.info], api_name="model_info")
        demo.load(
            atlas.show_stored, inputs=atlas.stored_inputs, outputs=atlas.stored_outputs,
            api_name="stored_atlas", concurrency_id=LAB_JOBS,
        )
    demo.queue(default_concurrency_limit=1)
    return demo


def serving_access(host: str, allow_remote: bool, auth, files_dir: str | Path | None, share: bool = False) -> FileAccess:
    """Check a launch's exposure before anything loads: what its inputs may read, or `ValueError` saying how to opt in."""
    remote = validate.serve_host(host, allow_remote, share)
    if auth is not None and not (isinstance(auth, tuple) and len(auth) == 2 and all(isinstance(part, str) and part for part in auth)):
        raise ValueError("auth must be (user, password), two non-empty strings (headlab app --auth user:password).")
    return FileAccess(files_dir=files_dir, remote=remote)


def exposure_warning(where: str, files: FileAccess, auth) -> str:
    """What a remote app exposes, printed when it starts."""
    who = "anyone who can reach it" if auth is None else "anyone with the login"
    readable = f"the files in {files.files_dir}" if files.files_dir is not None else "no server files (uploads only)"
    login = "There is no login: add auth=(user, password) (--auth user:password). " if auth is None else ""
    return (
        f"headlab: WARNING: the app is served on {where} to other machines: {who} can run jobs on the model "
        f"(one at a time, CPU/GPU time), load Hugging Face models onto this server, read {readable}, "
        f"and add results to the store. {login}Gradio serves plain HTTP: put HTTPS in front of it beyond a trusted network."
    )


def launch(
    host: str = "127.0.0.1",
    port: int = 7860,
    lab: hl.Lab | None = None,
    prevent_thread_lock: bool = False,
    model: str = "embedded",
    *,
    allow_remote: bool = False,
    auth: tuple[str, str] | None = None,
    files_dir: str | Path | None = None,
    **kw,
) -> gr.Blocks:
    """Serve the app on `host:port`. Without `lab`, loads `model` first so the app opens ready.

    A `host` other than loopback (127.0.0.1, localhost, ::1) or `share=True` raises `ValueError` unless
    `allow_remote=True`, and then prints what the app exposes. `auth=(user, password)` is Gradio's login.
    Typed file paths (Retrieval haystack, Select & copy dataset) and local model folders are read only
    inside `files_dir`; uploads always work. Extra keyword arguments go to `gr.Blocks.launch`. Returns the
    Blocks (call `.close()` to stop it when `prevent_thread_lock=True`).
    """
    files = serving_access(host, allow_remote, auth, files_dir, share=bool(kw.get("share")))
    if lab is None:
        print(f"headlab: loading {model} ...", flush=True)
        lab = hl.load(model)
        print(f"headlab: {lab.info.name} ready in {lab.load_seconds:.1f} s", flush=True)
    demo = build_app(lab, files)
    if files.remote:
        print(exposure_warning("a public share link" if kw.get("share") else f"{host}:{port}", files, auth), file=sys.stderr, flush=True)
    demo.launch(
        server_name=host, server_port=port, prevent_thread_lock=prevent_thread_lock, auth=auth,
        footer_links=kw.pop("footer_links", ["api", "gradio"]), **kw,
    )
    return demo


if __name__ == "__main__":
    launch()
