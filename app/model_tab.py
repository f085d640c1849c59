"""The Model tab: load "embedded", a Hugging Face name or a local folder (where the app's `FileAccess`
allows one); show the model's shape as a small table (`model_facts`)."""
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from app.feedback import current_session, progress_to
from app.views import table
from app.workbench import Workbench
from headlab.errors import user_message

MODEL_EXAMPLES = ["embedded", "gpt2", "Qwen/Qwen2.5-0.5B"]


@dataclass
class ModelTab:
    name: gr.Textbox
    load_button: gr.Button
    status: gr.Markdown
    info: gr.Dataframe  # the visitor's model's facts (`model_facts`)
    loaded: gr.State  # this visitor's count of successful loads; its .change event tells the other tabs the model changed


FACT_COLUMNS = ["fact", "value"]


def model_facts(lab) -> pd.DataFrame:
    """The facts of a `Lab`'s model a reader wants (its `ModelInfo`, device and dtype), one per row, as text."""
    info = lab.info
    rows = [("name", info.name), ("architecture", info.architecture), ("layers", info.n_layers),
            ("query heads per layer", info.n_heads), ("KV heads per layer", info.n_kv_heads), ("head dimension", info.d_head),
            ("model dimension", info.d_model), ("context (tokens)", info.n_ctx), ("vocabulary", info.d_vocab),
            ("device", lab.device), ("dtype", str(lab.dtype).removeprefix("torch.")), ("weights fingerprint", info.fingerprint)]
    return pd.DataFrame([(name, str(value)) for name, value in rows], columns=FACT_COLUMNS)


def current_model(bench: Workbench) -> tuple[str, pd.DataFrame]:
    """Status line and facts of the visitor's model."""
    return bench.model_summary(), model_facts(bench.lab)


def failed_load_message(name_or_path: str, err: Exception, current: str) -> str:
    return f"⚠️ **Could not load `{name_or_path}`.** {user_message(err)}\n\nYou keep using **{current}**."


def pool_note(bench: Workbench) -> str:
    held = ", ".join(f"`{key}`" for key in bench.pool.keys())
    return (f"Models loaded on this server now: {held} ({bench.pool.held_bytes() / 2**30:.2f} GiB of weights; the least "
            f"recently used are unloaded beyond {bench.pool.budget_bytes / 2**30:.0f} GiB). Loading one makes it **your** "
            "model on every tab; other visitors keep theirs.")


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
        "If loading fails, you keep your current model."
    )
    examples = MODEL_EXAMPLES + (["a local folder"] if bench.files.any_folder or bench.files.files_dir else [])
    with gr.Row():
        name = gr.Textbox(value="embedded", label="Model", placeholder=", ".join(examples), scale=4, elem_id="model-name")
        load_button = gr.Button("Load model", variant="primary", scale=1, elem_id="model-load")
    status = gr.Markdown(bench.model_summary(), label="model summary", elem_id="model-status")
    info = table(model_facts(bench.lab), label="the model", elem_id="model-info", wrap=False)
    return ModelTab(name=name, load_button=load_button, status=status, info=info, loaded=gr.State(0))


def wire(tab: ModelTab, bench: Workbench, concurrency_id: str) -> ModelTab:
    def load_model(name_or_path: str, loads: int, progress=gr.Progress()) -> tuple:
        """The visitor's model becomes `name_or_path` (loaded into the shared pool unless it is there). A failed
        load is reported in the status line (the visitor's ModelInfo and model stay as they were)."""
        _, session = current_session()
        previous = bench.pool.get(bench.model_key(session)).lab.info.name
        try:
            lab = bench.load(name_or_path, session, progress=progress_to(progress))
        except Exception as err:  # any failure, not only ModelLoadError, must leave the app usable
            return failed_load_message(name_or_path, err, previous), gr.skip(), gr.skip()
        return f"Your model is now **{lab.info.name}**. {pool_note(bench)}", model_facts(lab), (loads or 0) + 1

    # Loads have their own queue: a download must not hold up other visitors' jobs, nor theirs a load.
    event = {"fn": load_model, "inputs": [tab.name, tab.loaded], "outputs": [tab.status, tab.info, tab.loaded],
             "concurrency_id": "loads"}
    tab.load_button.click(api_name="load_model", **event)
    tab.name.submit(api_visibility="private", **event)
    return tab


def build_model_tab(bench: Workbench, concurrency_id: str) -> ModelTab:
    return wire(layout(bench), bench, concurrency_id)
