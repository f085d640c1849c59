"""The Export & runtime tab: turn a score into a head mask, see the KV memory it saves, download it,
and run it in headlab's compressed-KV runtime side by side with the full cache.

Every event rebuilds the mask from the form (scores come from the store), so the tab keeps no state.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

import headlab as hl
from app.feedback import shows_errors
from app.inputs import check_count
from app.retrieval_tab import parse_numbers
from app.workbench import Workbench
from headlab import runtime
from headlab.masks import HeadMask, MaskConfig, kv_memory, make_mask
from headlab.runtime.benchmark import readable
from headlab.runtime.quality import quality_at_budget, side_by_side

SOURCES = {"top KV heads of a score": "score", "random KV heads (same budget)": "random", "all streaming (StreamingLLM)": "all_streaming"}
MASK = MaskConfig()  # the form's defaults
MAX_NEW_TOKENS = 64
DEFAULT_CONTEXTS = "256, 512"  # CPU-sized; a GPU box can measure 8k and more
DEFAULT_QUALITY_LENGTH = 512


@dataclass
class RuntimeTab:
    source: gr.Radio
    kind: gr.Dropdown
    full_fraction: gr.Slider
    sink: gr.Number
    recent: gr.Number
    build_button: gr.Button
    status: gr.Markdown
    mask_plot: gr.Plot
    memory_plot: gr.Plot
    json_file: gr.File
    duo_file: gr.File
    prompt: gr.Textbox
    new_tokens: gr.Number
    generate_button: gr.Button
    full_text: gr.Textbox
    compressed_text: gr.Textbox
    generation_table: gr.Dataframe
    contexts: gr.Textbox
    measure_button: gr.Button
    measure_table: gr.Dataframe
    quality_length: gr.Number
    quality_button: gr.Button
    quality_table: gr.Dataframe


def form_mask(bench: Workbench, source_label: str, kind: str, full_fraction: float, sink: float, recent: float) -> HeadMask:
    """The mask the form describes, for the current model."""
    sink_tokens = check_count(sink, "sink tokens", 0, bench.info.n_ctx)
    recent_tokens = check_count(recent, "recent tokens", 1, bench.info.n_ctx)
    return make_mask(bench.lab, SOURCES[source_label], kind=kind, full_fraction=float(full_fraction),
                     sink=sink_tokens, recent=recent_tokens)


def export_files(mask: HeadMask) -> tuple[str, str]:
    """The mask as `headlab.head_mask/v1` JSON and as a zipped DuoAttention folder, in a fresh temp folder."""
    folder = Path(tempfile.mkdtemp(prefix="headlab-mask-"))
    json_path = mask.save(folder / "head_mask.json")
    duo = mask.save_duo(folder / "duo_attention")
    archive = shutil.make_archive(str(folder / "duo_attention_mask"), "zip", root_dir=duo)
    return str(json_path), archive


def default_prompt(bench: Workbench) -> str:
    """A needle prompt of ~600 tokens: streaming heads alone lose the needle, retrieval heads keep it."""
    import random

    from headlab.datasets import needles

    needle = needles.make_needle("fact", random.Random(0))
    sample = needles.build_sample(bench.lab, needle, needles.haystack_text("filler"), 600, 0.2)
    return bench.lab.tokenizer.decode(sample.tokens[0, 1:])


def measure_frame(bench: Workbench, mask: HeadMask, contexts: list[int]) -> pd.DataFrame:
    """`runtime.measure` for the full cache and `mask`, in MiB and ms for reading."""
    for context in contexts:
        bench.lab.check_length(context, "measured context")
    return readable(runtime.measure(bench.lab, mask, contexts=contexts, new_tokens=8, warmup=2))


def quality_frame(bench: Workbench, mask: HeadMask, length: int) -> pd.DataFrame:
    """Needle accuracy and KL vs the full cache for `mask`, a random mask and all-streaming at the same budget."""
    return quality_at_budget(bench.lab, mask, lengths=[length]).round(4)


def mask_layout(bench: Workbench) -> dict:
    """The mask form (defaults from `MaskConfig`), its figures and the two downloads."""
    gr.Markdown(
        "A **head mask** keeps the full KV cache only for the heads that retrieve (RazorAttention, DuoAttention); "
        "every other KV head streams: it keeps the first `sink` tokens and the last `recent`. headlab's runtime "
        "frees that memory for real. With grouped-query attention a KV head is full when the best of its query heads is."
    )
    kinds = hl.kinds()
    with gr.Row():
        source = gr.Radio(list(SOURCES), value=next(k for k, v in SOURCES.items() if v == MASK.source), label="full KV heads",
                          elem_id="runtime-source", scale=3)
        kind = gr.Dropdown(kinds, value=MASK.kind if MASK.kind in kinds else kinds[0], label="score", elem_id="runtime-kind")
        full_fraction = gr.Slider(0.0, 1.0, value=MASK.full_fraction, step=0.05, label="share of KV heads kept full", elem_id="runtime-fraction")
        sink = gr.Number(MASK.sink, precision=0, label="sink tokens", elem_id="runtime-sink")
        recent = gr.Number(MASK.recent, precision=0, label="recent tokens", elem_id="runtime-recent")
        build_button = gr.Button("Build mask", variant="primary", elem_id="runtime-build")
    status = gr.Markdown("Press **Build mask** (scores come from the store).", elem_id="runtime-status")
    with gr.Row():
        mask_plot = gr.Plot(label="the mask", elem_id="runtime-mask")
        memory_plot = gr.Plot(label="predicted KV memory", elem_id="runtime-memory")
    with gr.Row():
        json_file = gr.File(label="headlab.head_mask/v1 JSON", elem_id="runtime-json")
        duo_file = gr.File(label="DuoAttention folder (zip)", elem_id="runtime-duo")
    return dict(source=source, kind=kind, full_fraction=full_fraction, sink=sink, recent=recent, build_button=build_button,
                status=status, mask_plot=mask_plot, memory_plot=memory_plot, json_file=json_file, duo_file=duo_file)


def run_layout(bench: Workbench) -> dict:
    """Generation side by side, and the live memory / speed / quality measurements."""
    gr.Markdown("### Generate with the full cache and with the compressed cache")
    with gr.Row():
        prompt = gr.Textbox(default_prompt(bench), label="prompt", lines=4, scale=4, elem_id="runtime-prompt")
        new_tokens = gr.Number(16, precision=0, label="new tokens", elem_id="runtime-new-tokens", scale=1)
        generate_button = gr.Button("Generate side by side", variant="primary", elem_id="runtime-generate", scale=1)
    with gr.Row():
        full_text = gr.Textbox(label="full cache", lines=3, elem_id="runtime-full-text")
        compressed_text = gr.Textbox(label="compressed cache (this mask)", lines=3, elem_id="runtime-compressed-text")
    generation_table = gr.Dataframe(label="KV cache held", interactive=False, elem_id="runtime-generation-table")
    gr.Markdown("### Measure live: memory and speed against the full cache, and what the mask costs in quality")
    with gr.Row():
        contexts = gr.Textbox(DEFAULT_CONTEXTS, label="contexts (tokens)", elem_id="runtime-contexts")
        measure_button = gr.Button("Measure memory and speed", elem_id="runtime-measure")
        quality_length = gr.Number(DEFAULT_QUALITY_LENGTH, precision=0, label="quality: context (tokens)", elem_id="runtime-quality-length")
        quality_button = gr.Button("Measure quality", elem_id="runtime-quality")
    measure_table = gr.Dataframe(label="full cache vs compressed", interactive=False, elem_id="runtime-measure-table")
    quality_table = gr.Dataframe(label="needle accuracy (3 depths) and KL vs the full cache on prose", interactive=False,
                                 elem_id="runtime-quality-table")
    return dict(prompt=prompt, new_tokens=new_tokens, generate_button=generate_button, full_text=full_text,
                compressed_text=compressed_text, generation_table=generation_table, contexts=contexts,
                measure_button=measure_button, measure_table=measure_table, quality_length=quality_length,
                quality_button=quality_button, quality_table=quality_table)


def wire(tab: RuntimeTab, bench: Workbench, concurrency_id: str) -> None:
    """The tab's events: each rebuilds the mask from the form and shows what the library returns."""

    @shows_errors
    def build(*form) -> tuple:
        mask = form_mask(bench, *form)
        memory = kv_memory(mask, bench.info, bench.lab.dtype.itemsize)
        return memory.summary(), mask.figure(), memory.figure(), *export_files(mask)

    @shows_errors
    def generate(*form) -> tuple:
        *mask_form, prompt_text, n_new = form
        result = side_by_side(bench.lab, form_mask(bench, *mask_form), prompt_text, check_count(n_new, "new tokens", 1, MAX_NEW_TOKENS))
        return result.full_text, result.compressed_text, result.to_frame()

    @shows_errors
    def measure_live(*form) -> pd.DataFrame:
        *mask_form, contexts_text = form
        return measure_frame(bench, form_mask(bench, *mask_form), parse_numbers(contexts_text, "contexts", int))

    @shows_errors
    def measure_quality(*form) -> pd.DataFrame:
        *mask_form, length = form
        return quality_frame(bench, form_mask(bench, *mask_form), check_count(length, "quality context", 64, bench.info.n_ctx))

    form = [tab.source, tab.kind, tab.full_fraction, tab.sink, tab.recent]
    lab_job = {"concurrency_id": concurrency_id}
    tab.measure_button.click(measure_live, inputs=[*form, tab.contexts], outputs=[tab.measure_table], api_name="runtime_measure", **lab_job)
    tab.quality_button.click(measure_quality, inputs=[*form, tab.quality_length], outputs=[tab.quality_table],
                             api_name="runtime_quality", **lab_job)
    tab.build_button.click(build, inputs=form, outputs=[tab.status, tab.mask_plot, tab.memory_plot, tab.json_file, tab.duo_file],
                           api_name="export_mask", **lab_job)
    tab.generate_button.click(generate, inputs=[*form, tab.prompt, tab.new_tokens],
                              outputs=[tab.full_text, tab.compressed_text, tab.generation_table], api_name="runtime_generate", **lab_job)


def build_runtime_tab(bench: Workbench, concurrency_id: str) -> RuntimeTab:
    tab = RuntimeTab(**mask_layout(bench), **run_layout(bench))
    wire(tab, bench, concurrency_id)
    return tab
