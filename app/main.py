"""The headlab web app: one tab per question (Model, Head atlas, Ablate, Retrieval, Sinks, Successor,
Select & copy, Safety, Channels, Export & runtime) on one shared model, one job at a time.

    from app.main import launch
    launch(host="127.0.0.1", port=7860)          # loads the embedded model first

`build_app(lab)` returns the `gr.Blocks` (queue configured) without serving it.
"""
import gradio as gr

import headlab as hl
from app.ablate_tab import build_ablate_tab
from app.atlas_tab import build_atlas_tab
from app.channels_tab import build_channels_tab
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


def build_app(lab: hl.Lab | None = None) -> gr.Blocks:
    """The app's Blocks, working on `lab` (default: load the embedded model now)."""
    bench = Workbench(lab if lab is not None else hl.load("embedded"))
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


def launch(
    host: str = "127.0.0.1",
    port: int = 7860,
    lab: hl.Lab | None = None,
    prevent_thread_lock: bool = False,
    model: str = "embedded",
    **kw,
) -> gr.Blocks:
    """Serve the app on `host:port`. Without `lab`, loads `model` first so the app opens ready.

    Extra keyword arguments go to `gr.Blocks.launch`. Returns the Blocks (call `.close()` to stop it
    when `prevent_thread_lock=True`).
    """
    if lab is None:
        print(f"headlab: loading {model} ...", flush=True)
        lab = hl.load(model)
        print(f"headlab: {lab.info.name} ready in {lab.load_seconds:.1f} s", flush=True)
    demo = build_app(lab)
    demo.launch(
        server_name=host, server_port=port, prevent_thread_lock=prevent_thread_lock,
        footer_links=kw.pop("footer_links", ["api", "gradio"]), **kw,
    )
    return demo


if __name__ == "__main__":
    launch()
