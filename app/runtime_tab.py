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
import plotly.graph_objects as go
from plotly.subplots import make_subplots

import headlab as hl
from app.feedback import shows_errors
from app.inputs import check_count
from app.retrieval_tab import parse_numbers
from app.workbench import Workbench
from headlab.masks import HeadMask, make_mask
from headlab import runtime
from headlab.runtime import CompressedLM
from headlab.runtime.quality import quality
from headlab.generation import greedy_generate

SOURCES = {"top KV heads of a score": "score", "random KV heads (same budget)": "random", "all streaming (StreamingLLM)": "all_streaming"}
DEFAULT_KIND = "retrieval"
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


def dtype_bytes(bench: Workbench) -> int:
    return next(bench.lab.hf_model.parameters()).element_size()


def memory_frame(bench: Workbench, mask: HeadMask, points: int = 16) -> pd.DataFrame:
    """Ideal KV bytes (MiB) against context length for the full cache, `mask` and all-streaming."""
    info, size = bench.info, dtype_bytes(bench)
    streaming = HeadMask.all_streaming(info, sink=mask.sink, recent=mask.recent)
    full = HeadMask.all_full(info)
    lengths = sorted({max(1, round(info.n_ctx * i / points)) for i in range(1, points + 1)})
    mib = 2**20
    return pd.DataFrame({
        "context": lengths,
        "full cache": [full.ideal_kv_bytes(n, size, info.d_head) / mib for n in lengths],
        "this mask": [mask.ideal_kv_bytes(n, size, info.d_head) / mib for n in lengths],
        "all streaming": [streaming.ideal_kv_bytes(n, size, info.d_head) / mib for n in lengths],
    })


def mask_figure(mask: HeadMask) -> go.Figure:
    fig = go.Figure(go.Heatmap(
        z=mask.full.int().T.numpy(), x=list(range(mask.n_layers)), y=[f"KV {h}" for h in range(mask.n_kv_heads)],
        colorscale=[[0, "#cbd5e1"], [1, "#dc2626"]], zmin=0, zmax=1, showscale=False,
        hovertemplate="layer %{x}, %{y}: %{z}<extra>1 = full cache, 0 = streaming</extra>",
    ))
    fig.update_layout(title=f"{mask.n_full} of {mask.full.numel()} KV heads keep the full cache (red)",
                      xaxis_title="layer", height=260, margin={"l": 60, "r": 20, "t": 50, "b": 40})
    return fig


def memory_figure(frame: pd.DataFrame) -> go.Figure:
    fig = make_subplots()
    for column, dash in (("full cache", "solid"), ("this mask", "solid"), ("all streaming", "dot")):
        fig.add_trace(go.Scatter(x=frame["context"], y=frame[column], name=column, mode="lines", line={"dash": dash}))
    fig.update_layout(title="KV cache the runtime must hold (batch 1)", xaxis_title="context length (tokens)",
                      yaxis_title="MiB", height=340, margin={"l": 60, "r": 20, "t": 50, "b": 40})
    return fig


def summary(bench: Workbench, mask: HeadMask, frame: pd.DataFrame) -> str:
    last = frame.iloc[-1]
    return (f"{mask!r}. At {int(last['context'])} tokens the KV cache needs **{last['this mask']:.1f} MiB** instead of "
            f"{last['full cache']:.1f} MiB ({100 * last['this mask'] / last['full cache']:.0f}%); streaming heads keep "
            f"{mask.sink} + {mask.recent} tokens.")


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


def side_by_side(bench: Workbench, mask: HeadMask, prompt: str, new_tokens: int) -> tuple[str, str, pd.DataFrame]:
    """Greedy text from the full cache (the plain model) and from the compressed runtime, with their KV bytes."""
    lab = bench.lab
    tokens = lab.to_tokens(prompt)
    generated, _ = greedy_generate(lab, tokens, new_tokens)
    runtime = CompressedLM(lab, mask)
    compressed = runtime.generate(tokens, max_new_tokens=new_tokens, stop_at_eos=False)
    length, size = tokens.shape[1] + new_tokens - 1, dtype_bytes(bench)
    full_bytes = HeadMask.all_full(lab.info).ideal_kv_bytes(length, size, lab.info.d_head)
    ideal, held = mask.ideal_kv_bytes(length, size, lab.info.d_head), runtime.kv_bytes()
    mib = 2**20
    table = pd.DataFrame([
        {"cache": "full (plain model)", "tokens": length, "KV MiB held": round(full_bytes / mib, 2),
         "KV MiB ideal": round(full_bytes / mib, 2), "held vs full": "100%"},
        {"cache": "headlab compressed", "tokens": length, "KV MiB held": round(held / mib, 2),
         "KV MiB ideal": round(ideal / mib, 2), "held vs full": f"{100 * held / full_bytes:.0f}%"},
    ])
    decode = lab.tokenizer.decode
    return decode(generated, skip_special_tokens=True), decode(compressed[0].tolist(), skip_special_tokens=True), table


def measure_frame(bench: Workbench, mask: HeadMask, contexts: list[int]) -> pd.DataFrame:
    """`runtime.measure` for the full cache and `mask`, in MiB and ms for reading."""
    for context in contexts:
        bench.lab.check_length(context, "measured context")
    table = runtime.measure(bench.lab, mask, contexts=contexts, new_tokens=8, warmup=2)
    mib = 2**20
    return pd.DataFrame({
        "context": table["context"], "cache": table["cache"],
        "KV MiB held": (table["kv_bytes"] / mib).round(2), "KV MiB ideal": (table["ideal_kv_bytes"] / mib).round(2),
        "held / ideal": table["kv_ratio"].round(3), "prefill s": table["prefill_s"].round(2),
        "decode ms/token": table["decode_ms"].round(1),
    })


def quality_frame(bench: Workbench, mask: HeadMask, length: int) -> pd.DataFrame:
    """Needle accuracy and KL vs the full cache for `mask`, a random mask and all-streaming at the same budget."""
    info = bench.info
    masks = {
        "this mask": mask,
        "random, same budget": HeadMask.random(info, mask.full_fraction, sink=mask.sink, recent=mask.recent),
        "all streaming": HeadMask.all_streaming(info, sink=mask.sink, recent=mask.recent),
    }
    return quality(bench.lab, masks, lengths=[length], kl_tokens=length).round(4)


def build_runtime_tab(bench: Workbench, concurrency_id: str) -> RuntimeTab:
    gr.Markdown(
        "A **head mask** keeps the full KV cache only for the heads that retrieve (RazorAttention, DuoAttention); "
        "every other KV head streams: it keeps the first `sink` tokens and the last `recent`. headlab's runtime "
        "frees that memory for real. With grouped-query attention a KV head is full when the best of its query heads is."
    )
    kinds = hl.kinds()
    with gr.Row():
        source = gr.Radio(list(SOURCES), value=list(SOURCES)[0], label="full KV heads", elem_id="runtime-source", scale=3)
        kind = gr.Dropdown(kinds, value=DEFAULT_KIND if DEFAULT_KIND in kinds else kinds[0], label="score", elem_id="runtime-kind")
        full_fraction = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="share of KV heads kept full", elem_id="runtime-fraction")
        sink = gr.Number(64, precision=0, label="sink tokens", elem_id="runtime-sink")
        recent = gr.Number(256, precision=0, label="recent tokens", elem_id="runtime-recent")
        build_button = gr.Button("Build mask", variant="primary", elem_id="runtime-build")
    status = gr.Markdown("Press **Build mask** (scores come from the store).", elem_id="runtime-status")
    with gr.Row():
        mask_plot = gr.Plot(label="the mask", elem_id="runtime-mask")
        memory_plot = gr.Plot(label="predicted KV memory", elem_id="runtime-memory")
    with gr.Row():
        json_file = gr.File(label="headlab.head_mask/v1 JSON", elem_id="runtime-json")
        duo_file = gr.File(label="DuoAttention folder (zip)", elem_id="runtime-duo")
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

    form = [source, kind, full_fraction, sink, recent]

    @shows_errors
    def build(source_label, kind_value, fraction, sink_value, recent_value) -> tuple:
        mask = form_mask(bench, source_label, kind_value, fraction, sink_value, recent_value)
        frame = memory_frame(bench, mask)
        return summary(bench, mask, frame), mask_figure(mask), memory_figure(frame), *export_files(mask)

    @shows_errors
    def generate(source_label, kind_value, fraction, sink_value, recent_value, prompt_text, n_new) -> tuple:
        mask = form_mask(bench, source_label, kind_value, fraction, sink_value, recent_value)
        return side_by_side(bench, mask, prompt_text, check_count(n_new, "new tokens", 1, MAX_NEW_TOKENS))

    @shows_errors
    def measure_live(source_label, kind_value, fraction, sink_value, recent_value, contexts_text) -> pd.DataFrame:
        mask = form_mask(bench, source_label, kind_value, fraction, sink_value, recent_value)
        return measure_frame(bench, mask, parse_numbers(contexts_text, "contexts", int))

    @shows_errors
    def measure_quality(source_label, kind_value, fraction, sink_value, recent_value, length) -> pd.DataFrame:
        mask = form_mask(bench, source_label, kind_value, fraction, sink_value, recent_value)
        return quality_frame(bench, mask, check_count(length, "quality context", 64, bench.info.n_ctx))

    lab_job = {"concurrency_id": concurrency_id}
    measure_button.click(measure_live, inputs=[*form, contexts], outputs=[measure_table], api_name="runtime_measure", **lab_job)
    quality_button.click(measure_quality, inputs=[*form, quality_length], outputs=[quality_table], api_name="runtime_quality", **lab_job)
    build_button.click(build, inputs=form, outputs=[status, mask_plot, memory_plot, json_file, duo_file],
                       api_name="export_mask", **lab_job)
    generate_button.click(generate, inputs=[*form, prompt, new_tokens], outputs=[full_text, compressed_text, generation_table],
                          api_name="runtime_generate", **lab_job)
    return RuntimeTab(
        source=source, kind=kind, full_fraction=full_fraction, sink=sink, recent=recent, build_button=build_button,
        status=status, mask_plot=mask_plot, memory_plot=memory_plot, json_file=json_file, duo_file=duo_file, prompt=prompt,
        new_tokens=new_tokens, generate_button=generate_button, full_text=full_text, compressed_text=compressed_text,
        generation_table=generation_table, contexts=contexts, measure_button=measure_button, measure_table=measure_table,
        quality_length=quality_length, quality_button=quality_button, quality_table=quality_table,
    )
