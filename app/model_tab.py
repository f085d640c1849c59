"""The Model tab: load "embedded", a Hugging Face name or a local folder (where the app's `FileAccess`
allows one); show the model's shape."""
from dataclasses import dataclass

import gradio as gr

from app.feedback import progress_to
from app.workbench import Workbench
from headlab.errors import user_message

MODEL_EXAMPLES = ["embedded", "gpt2", "Qwen/Qwen2.5-0.5B"]


@dataclass
class ModelTab:
    name: gr.Textbox
    load_button: gr.Button
    status: gr.Markdown
    info: gr.JSON
    loaded: gr.State  # count of successful loads; its .change event tells other tabs the model changed


def current_model(bench: Workbench) -> tuple[str, dict]:
    """Status line and ModelInfo of the model the app works on now."""
    return bench.model_summary(), bench.info.to_dict()


def failed_load_message(name_or_path: str, err: Exception, current: str) -> str:
    return f"⚠️ **Could not load `{name_or_path}`.** {user_message(err)}\n\nThe app keeps using **{current}**."


def local_folders(bench: Workbench) -> str:
    """Which local model folders this app loads, for the tab's intro."""
    if bench.files.any_folder:
        return "or a local folder saved with `save_pretrained`"
    if bench.files.files_dir is not None:
        return "or a folder saved with `save_pretrained` inside the app's files folder (its name, or a path in it)"
    return "(local folders are off: this app serves other machines without a files folder)"


def layout(bench: Workbench) -> ModelTab:
    gr.Markdown(
        "Load **embedded** (SmolLM2-135M-Instruct, shipped with headlab, works offline), a Hugging Face "
        f"name (needs the network or the local Hugging Face cache) {local_folders(bench)}. "
        "If loading fails, the app keeps the current model."
    )
    examples = MODEL_EXAMPLES + (["a local folder"] if bench.files.any_folder or bench.files.files_dir else [])
    with gr.Row():
        name = gr.Textbox(value="embedded", label="Model", placeholder=", ".join(examples), scale=4, elem_id="model-name")
        load_button = gr.Button("Load model", variant="primary", scale=1, elem_id="model-load")
    status = gr.Markdown(bench.model_summary(), label="model summary", elem_id="model-status")
    info = gr.JSON(value=bench.info.to_dict(), label="ModelInfo", elem_id="model-info")
    return ModelTab(name=name, load_button=load_button, status=status, info=info, loaded=gr.State(bench.loads))


def wire(tab: ModelTab, bench: Workbench, concurrency_id: str) -> ModelTab:
    def load_model(name_or_path: str, progress=gr.Progress()) -> tuple:
        """A failed load is reported in the status line (the ModelInfo and the model stay as they were)."""
        try:
            bench.load(name_or_path, progress=progress_to(progress))
        except Exception as err:  # any failure, not only ModelLoadError, must leave the app usable
            return failed_load_message(name_or_path, err, bench.info.name), gr.skip(), gr.skip()
        return *current_model(bench), bench.loads

    event = {"fn": load_model, "inputs": [tab.name], "outputs": [tab.status, tab.info, tab.loaded], "concurrency_id": concurrency_id}
    tab.load_button.click(api_name="load_model", **event)
    tab.name.submit(api_visibility="private", **event)
    return tab


def build_model_tab(bench: Workbench, concurrency_id: str) -> ModelTab:
    return wire(layout(bench), bench, concurrency_id)
