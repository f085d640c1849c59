"""The headlab web app: one tab per question (Model, Head atlas, Ablate, Retrieval, Sinks, Successor,
Select & copy, Safety, Channels, Export & runtime). Each visitor picks their own model from a shared pool
(`app.pool`, `app.workbench`); jobs run one at a time with progress and a Cancel button, and reading stored
results never waits behind them (`app.feedback`).

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
from app.feedback import JOBS, READ_EVENT, attach, current_session, reads_store
from app.inputs import FileAccess
from app.model_tab import build_model_tab, current_model
from app.page import CSS, GLOSSARY, PAGE_JS, STALE_HEAD, set_tab_js, wire_staleness
from app.pool import ModelPool
from app.retrieval_tab import build_retrieval_tab
from app.runtime_tab import build_runtime_tab
from app.compare_masks_tab import build_compare_masks_tab
from app.diff_tab import build_diff_tab
from app.safety_tab import build_safety_tab
from app.select_copy_tab import build_select_copy_tab
from app.sinks_tab import build_sinks_tab
from app.successor_tab import build_successor_tab
from app.workbench import Workbench

# Every event that computes on a model is in this concurrency group (one job at a time, queue position shown);
# reading stored results is not (`app.feedback.READ_EVENT`).
LAB_JOBS = JOBS
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
    ("Compare masks", "compare_masks", build_compare_masks_tab),
    ("Compare models", "diff", build_diff_tab),
]


def first_views(tabs: dict) -> list[tuple[str, object]]:
    """(tab id, tab) for each built tab that opens on stored results (it has `first_view` and `first_outputs`)."""
    return [(tab_id, tab) for tab_id, tab in tabs.items() if callable(getattr(tab, "first_view", None))]


def wire_first_views(demo: gr.Blocks, tabs: dict, trigger) -> None:
    """Each tab's first view on page load (`/first_<tab>`) and again when the visitor's model changes. The views read
    stored results only and run one after another, the Head atlas first (so a page opened while jobs run shows it
    at once); the model-bound follow-ups (`first_then`, e.g. a pattern view, which waits while a job holds the
    visitor's model) come after all of them."""
    for start in (demo.load, trigger.change):
        event, follows = None, []
        for tab_id, tab in first_views(tabs):
            view = dict(fn=reads_store(tab.first_view), inputs=getattr(tab, "first_inputs", []), outputs=tab.first_outputs,
                        **READ_EVENT)
            naming = {"api_name": f"first_{tab_id}"} if start == demo.load else {"api_visibility": "private"}
            event = start(**view, **naming) if event is None else event.then(**view, **naming)
            follows += [tab.first_then] if getattr(tab, "first_then", None) else []
        for follow in follows:
            event = event.then(api_visibility="private", **follow)


def build_app(lab: hl.Lab | None = None, files: FileAccess | None = None, *, pool: ModelPool | None = None,
              model: str = "embedded") -> gr.Blocks:
    """The app's Blocks. `lab` (default: load `model` now) is every visitor's first model, held in `pool` (default:
    a new `ModelPool` reading the server files `files` allows) under the name `model`; visitors may load others."""
    bench = Workbench(lab if lab is not None else hl.load(model), files, pool=pool, default=model)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        attach(demo, bench)
        gr.Markdown(f"# {TITLE}\nWhat does each attention head do, and which ones can we cut?")
        with gr.Row(equal_height=True):
            model_bar = gr.Markdown(bench.model_summary(), elem_id="model-bar")
            cancel = gr.Button("Cancel my running job", variant="stop", size="sm", scale=0, elem_id="cancel-job")
        gr.Markdown(GLOSSARY)
        built = {}
        with gr.Tabs(elem_id="tabs") as tab_set:
            with gr.Tab("Model", id="model", elem_id="tab-model") as tab:
                model_tab = built["model"] = build_model_tab(bench, LAB_JOBS)
            tab.select(None, js=set_tab_js("model"))
            with gr.Tab("Head atlas", id="atlas", elem_id="tab-atlas") as tab:
                atlas = built["atlas"] = build_atlas_tab(bench, LAB_JOBS)
            tab.select(None, js=set_tab_js("atlas"))
            with gr.Tab("Ablate", id="ablate", elem_id="tab-ablate") as tab:
                built["ablate"] = build_ablate_tab(bench, atlas, LAB_JOBS)
            tab.select(None, js=set_tab_js("ablate"))
            for label, tab_id, build_tab in MODEL_TABS:
                with gr.Tab(label, id=tab_id, elem_id=f"tab-{tab_id.replace('_', '-')}") as tab:
                    built[tab_id] = build_tab(bench, LAB_JOBS)
                tab.select(None, js=set_tab_js(tab_id))

        # The visitor's model, on every tab: on page load and whenever they load another one.
        show_model = dict(fn=reads_store(lambda: current_model(bench)), outputs=[model_tab.status, model_tab.info], **READ_EVENT)
        demo.load(api_name="model_info", **show_model)
        demo.load(reads_store(bench.model_summary), outputs=[model_bar], api_visibility="private", **READ_EVENT)
        model_tab.loaded.change(reads_store(bench.model_summary), outputs=[model_bar], api_visibility="private", **READ_EVENT)
        wire_first_views(demo, built, model_tab.loaded)
        demo.load(open_tab, outputs=[tab_set], api_visibility="private", **READ_EVENT)
        demo.load(None, js=PAGE_JS)
        # Cancel: drop this visitor's queued jobs, and stop the running one at its next forward pass.
        jobs = [fn.get_config() for fn in demo.fns.values() if fn.concurrency_id == JOBS]
        cancel.click(lambda: bench.cancel(current_session()[1]), api_name="cancel", cancels=jobs, **READ_EVENT)
        demo.unload(lambda: bench.forget(current_session()[1]))
        wire_staleness(demo, JOBS)  # results that no longer answer the form are marked stale
    demo.queue(default_concurrency_limit=1)
    return demo


def open_tab(request: gr.Request):
    """The tab named by the address's `?tab=` (the page's own links), else the Model tab."""
    tab = dict(request.query_params).get("tab") if request is not None else None
    return gr.Tabs(selected=tab) if tab else gr.skip()


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
    pool: ModelPool | None = None,
    **kw,
) -> gr.Blocks:
    """Serve the app on `host:port`. Without `lab`, loads `model` first so the app opens ready.

    A `host` other than loopback (127.0.0.1, localhost, ::1) or `share=True` raises `ValueError` unless
    `allow_remote=True`, and then prints what the app exposes. `auth=(user, password)` is Gradio's login.
    Typed file paths (Retrieval haystack, Select & copy dataset) and local model folders are read only
    inside `files_dir`; uploads always work. `pool` (an `app.pool.ModelPool`) may hold models visitors can pick
    by name besides `lab`. Extra keyword arguments go to `gr.Blocks.launch`. Returns the
    Blocks (call `.close()` to stop it when `prevent_thread_lock=True`).
    """
    files = serving_access(host, allow_remote, auth, files_dir, share=bool(kw.get("share")))
    if lab is None:
        print(f"headlab: loading {model} ...", flush=True)
        lab = hl.load(model)
        print(f"headlab: {lab.info.name} ready in {lab.load_seconds:.1f} s", flush=True)
    if pool is not None:
        pool.files = files
    demo = build_app(lab, files, pool=pool, model=model)
    if files.remote:
        print(exposure_warning("a public share link" if kw.get("share") else f"{host}:{port}", files, auth), file=sys.stderr, flush=True)
    demo.launch(
        server_name=host, server_port=port, prevent_thread_lock=prevent_thread_lock, auth=auth, css=CSS, head=STALE_HEAD,
        footer_links=kw.pop("footer_links", ["api", "gradio"]), **kw,
    )
    return demo


if __name__ == "__main__":
    launch()
