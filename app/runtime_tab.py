"""The Export & runtime tab: turn a score into a head mask, see the KV memory it saves, download it,
and run it in headlab's compressed-KV runtime side by side with the full cache.

Every event rebuilds the mask from the form (scores come from the store), so the tab keeps no state. The live
measurements download as CSV (the table shown) and as JSON (`measurement_json`: the mask measured and every row
unrounded).
"""
from __future__ import annotations

import shutil
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import gradio as gr
import pandas as pd

import headlab as hl
from app.feedback import shows_errors
from app.inputs import check_count
from app.retrieval_tab import parse_numbers
from app.workbench import Workbench
from app.views import frame_records, json_button, record_json, table
from headlab import runtime
from headlab.masks import DUO_TSV, HeadMask, KVMemory, MaskConfig, kv_memory, make_mask
from headlab.runtime.benchmark import readable
from headlab.runtime.quality import quality_at_budget, side_by_side

SOURCES = {"top KV heads of a score": "score", "random KV heads (same budget)": "random", "all streaming (StreamingLLM)": "all_streaming"}
MASK = MaskConfig()  # the form's defaults
MAX_NEW_TOKENS = 64
DUO_FILES = f"{DUO_TSV} and config.json"
DEFAULT_CONTEXTS = "256, 512"  # CPU-sized; a GPU box can measure 8k and more
DEFAULT_QUALITY_LENGTH = 512
MEASURE_STEPS = {"new_tokens": 8, "warmup": 2}  # decode steps of a live measurement (CPU-sized)


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
    upload: gr.File
    prompt: gr.Textbox
    new_tokens: gr.Number
    generate_button: gr.Button
    full_text: gr.Textbox
    compressed_text: gr.Textbox
    generation_table: gr.Dataframe
    generation_json: gr.DownloadButton
    contexts: gr.Textbox
    measure_button: gr.Button
    measure_table: gr.Dataframe
    measure_json: gr.DownloadButton
    quality_length: gr.Number
    quality_button: gr.Button
    quality_table: gr.Dataframe
    quality_json: gr.DownloadButton
    first_view: Callable | None = None  # set by the wiring: the default mask, from stored scores

    @property
    def form(self) -> list:
        return [self.source, self.kind, self.full_fraction, self.sink, self.recent]

    @property
    def first_inputs(self) -> list:
        return self.form

    @property
    def first_outputs(self) -> list:
        return [self.status, self.mask_plot, self.memory_plot, self.json_file, self.duo_file]


MAX_ZIP_FILES, MAX_ZIP_BYTES = 8, 1 << 20  # a DuoAttention folder is a .tsv and a config.json


def unzip_mask(archive: str) -> Path:
    """A DuoAttention folder uploaded as a .zip, extracted into a fresh temp folder: only a few small plain files,
    no paths that leave the folder (absolute, '..', links), nothing executed or unpickled."""
    folder = Path(tempfile.mkdtemp(prefix="headlab-upload-"))
    try:
        with zipfile.ZipFile(archive) as zipped:
            members = [m for m in zipped.infolist() if not m.is_dir()]
            if not members or len(members) > MAX_ZIP_FILES or sum(m.file_size for m in members) > MAX_ZIP_BYTES:
                raise ValueError(f"The zip must hold a DuoAttention folder: {DUO_FILES}, at most {MAX_ZIP_FILES} small files.")
            for member in members:
                name = Path(member.filename)
                if name.is_absolute() or ".." in name.parts or (member.external_attr >> 16) & 0o170000 == 0o120000:
                    raise ValueError(f"The zip holds a path that leaves its folder ({member.filename!r}): refused.")
                (folder / name.name).write_bytes(zipped.read(member))  # flattened: the files sit at the top
    except zipfile.BadZipFile:
        raise ValueError("The uploaded file is not a readable .zip: upload a headlab JSON mask or a zipped DuoAttention folder.") from None
    return folder


def uploaded_mask(bench: Workbench, upload: str) -> HeadMask:
    """A mask file the visitor uploaded (headlab JSON, or a zipped DuoAttention folder), checked against their model."""
    path = Path(upload)
    return HeadMask.load(unzip_mask(upload) if path.suffix.lower() == ".zip" else path, info=bench.info)


def form_mask(bench: Workbench, source_label: str, kind: str, full_fraction: float, sink: float, recent: float,
              upload: str | None = None) -> HeadMask:
    """The mask the form describes (or the uploaded one), for the current model."""
    if upload:
        return uploaded_mask(bench, upload)
    sink_tokens = check_count(sink, "sink tokens", 0, bench.info.n_ctx)
    recent_tokens = check_count(recent, "recent tokens", 1, bench.info.n_ctx)
    return make_mask(bench.lab, SOURCES[source_label], kind=kind, full_fraction=float(full_fraction),
                     sink=sink_tokens, recent=recent_tokens)


def mask_facts(memory: KVMemory) -> str:
    """The mask of `memory` as a small Markdown table: its source, budget, full KV heads per layer, window and the KV
    bytes it needs at the model's context against the full cache (ideal bytes, `kv_memory`)."""
    mask, mine, full = memory.mask, memory.this_mask[-1], memory.full_cache[-1]
    source = ", ".join(f"{key} {mask.source[key]}" for key in ("source", "kind", "group") if mask.source.get(key)) or "?"
    per_layer = " ".join(str(int(n)) for n in mask.full.sum(1).tolist())
    rows = [("model", mask.model or "?"), ("source", source),
            ("budget", f"{mask.n_full}/{mask.full.numel()} KV heads full ({100 * mask.n_full / mask.full.numel():.0f}%)"),
            (f"full KV heads per layer (layers 0–{mask.n_layers - 1}, of {mask.n_kv_heads} each)", f"`{per_layer}`"),
            ("streaming heads keep", f"{mask.sink} sink + {mask.recent} recent tokens"),
            (f"KV cache at {memory.context[-1]} tokens", f"**{mine:.1f} MiB** instead of {full:.1f} MiB ({100 * mine / full:.0f}%)")]
    return "| mask | |\n|---|---|\n" + "\n".join(f"| {name} | {value} |" for name, value in rows)


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
    """`runtime.measure` for the full cache and `mask` (bytes and seconds; `readable` shows it in MiB and ms)."""
    for context in contexts:
        bench.lab.check_length(context, "measured context")
    return runtime.measure(bench.lab, mask, contexts=contexts, **MEASURE_STEPS)


def quality_frame(bench: Workbench, mask: HeadMask, length: int) -> pd.DataFrame:
    """Needle accuracy and KL vs the full cache for `mask`, a random mask and all-streaming at the same budget."""
    return quality_at_budget(bench.lab, mask, lengths=[length])


def measurement_json(bench: Workbench, record: str, mask: HeadMask, frame: pd.DataFrame, **params) -> str:
    """A live measurement as one JSON download: the model, the mask measured (its `headlab.head_mask/v1` record), the
    measurement's parameters and every row of `frame`, unrounded."""
    return record_json({"record": record, "model": bench.info.name, "mask": mask.to_record(), **params,
                        "rows": frame_records(frame)}, record.replace("_", "-"))


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
        json_file = gr.File(label="download: headlab.head_mask/v1 JSON", elem_id="runtime-json")
        duo_file = gr.File(label="download: DuoAttention folder (zip)", elem_id="runtime-duo")
        upload = gr.File(label="or upload your mask (headlab JSON, or a DuoAttention folder as .zip): it replaces the form above",
                         type="filepath", file_count="single", file_types=[".json", ".zip"], elem_id="runtime-upload")
    return dict(source=source, kind=kind, full_fraction=full_fraction, sink=sink, recent=recent, build_button=build_button,
                status=status, mask_plot=mask_plot, memory_plot=memory_plot, json_file=json_file, duo_file=duo_file, upload=upload)


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
    generation_table = table(label="KV cache held", interactive=False, elem_id="runtime-generation-table")
    generation_json = json_button("runtime-generation-json", "⬇ JSON of this generation")
    gr.Markdown("### Measure live: memory and speed against the full cache, and what the mask costs in quality")
    with gr.Row():
        contexts = gr.Textbox(DEFAULT_CONTEXTS, label="contexts (tokens)", elem_id="runtime-contexts")
        measure_button = gr.Button("Measure memory and speed", elem_id="runtime-measure")
        quality_length = gr.Number(DEFAULT_QUALITY_LENGTH, precision=0, label="quality: context (tokens)", elem_id="runtime-quality-length")
        quality_button = gr.Button("Measure quality", elem_id="runtime-quality")
    measure_table = table(label="full cache vs compressed", interactive=False, elem_id="runtime-measure-table")
    measure_json = json_button("runtime-measure-json", "⬇ JSON of this measurement")
    quality_table = table(label="needle accuracy (3 depths) and KL vs the full cache on prose", interactive=False,
                                 elem_id="runtime-quality-table")
    quality_json = json_button("runtime-quality-json", "⬇ JSON of this quality run")
    return dict(prompt=prompt, new_tokens=new_tokens, generate_button=generate_button, full_text=full_text,
                compressed_text=compressed_text, generation_table=generation_table, generation_json=generation_json,
                contexts=contexts,
                measure_button=measure_button, measure_table=measure_table, measure_json=measure_json,
                quality_length=quality_length, quality_button=quality_button, quality_table=quality_table,
                quality_json=quality_json)


def wire(tab: RuntimeTab, bench: Workbench, concurrency_id: str) -> None:
    """The tab's events: each rebuilds the mask from the form and shows what the library returns."""

    def mask_view(mask: HeadMask, uploaded: bool = False) -> tuple:
        memory = kv_memory(mask, bench.info, bench.lab.dtype.itemsize)
        origin = "**Your uploaded mask** (clear the upload to use the form again).\n\n" if uploaded else ""
        return origin + mask_facts(memory), mask.figure(), memory.figure(), *export_files(mask)

    @shows_errors
    def build(source, kind, full_fraction, sink, recent, upload=None) -> tuple:
        return mask_view(form_mask(bench, source, kind, full_fraction, sink, recent, upload), uploaded=bool(upload))

    @shows_errors
    def generate(source, kind, full_fraction, sink, recent, prompt_text, n_new, upload=None) -> tuple:
        mask = form_mask(bench, source, kind, full_fraction, sink, recent, upload)
        n_new = check_count(n_new, "new tokens", 1, MAX_NEW_TOKENS)
        result = side_by_side(bench.lab, mask, prompt_text, n_new)
        download = measurement_json(bench, "runtime_generation", mask, result.to_frame(), prompt=prompt_text, new_tokens=n_new,
                                    **asdict(result))  # the texts and the bytes, unrounded
        return result.full_text, result.compressed_text, result.to_frame(), download

    def first_view(source, kind, full_fraction, sink, recent) -> tuple:
        """The form's mask when its scores are stored (a mask from a score kind reads the stored run), else a hint."""
        if SOURCES.get(source) == "score" and hl.stored(bench.lab, kind) is None:
            return f"No stored **{kind}** run for {bench.info.name}: press **Build mask** to score and build.", None, None, None, None
        return mask_view(form_mask(bench, source, kind, full_fraction, sink, recent))

    form, upload = tab.form, tab.upload
    lab_job = {"concurrency_id": concurrency_id}
    tab.build_button.click(build, inputs=[*form, upload], outputs=tab.first_outputs, api_name="export_mask", **lab_job)
    upload.upload(build, inputs=[*form, upload], outputs=tab.first_outputs, api_visibility="private", **lab_job)
    tab.generate_button.click(generate, inputs=[*form, tab.prompt, tab.new_tokens, upload],
                              outputs=[tab.full_text, tab.compressed_text, tab.generation_table, tab.generation_json],
                              api_name="runtime_generate", **lab_job)
    wire_measures(tab, bench, lab_job)
    tab.first_view = first_view


def wire_measures(tab: RuntimeTab, bench: Workbench, lab_job: dict) -> None:
    """The live measurements of the form's mask: memory and speed, and quality; each a table and its JSON."""

    @shows_errors
    def measure_live(source, kind, full_fraction, sink, recent, contexts_text, upload=None) -> tuple:
        mask = form_mask(bench, source, kind, full_fraction, sink, recent, upload)
        contexts = parse_numbers(contexts_text, "contexts", int)
        frame = measure_frame(bench, mask, contexts)
        return readable(frame), measurement_json(bench, "runtime_measure", mask, frame, contexts=contexts, **MEASURE_STEPS)

    @shows_errors
    def measure_quality(source, kind, full_fraction, sink, recent, length, upload=None) -> tuple:
        mask = form_mask(bench, source, kind, full_fraction, sink, recent, upload)
        length = check_count(length, "quality context", 64, bench.info.n_ctx)
        frame = quality_frame(bench, mask, length)
        return frame.round(4), measurement_json(bench, "runtime_quality", mask, frame, length=length)

    form, upload = tab.form, tab.upload
    tab.measure_button.click(measure_live, inputs=[*form, tab.contexts, upload], outputs=[tab.measure_table, tab.measure_json],
                             api_name="runtime_measure", **lab_job)
    tab.quality_button.click(measure_quality, inputs=[*form, tab.quality_length, upload], outputs=[tab.quality_table, tab.quality_json],
                             api_name="runtime_quality", **lab_job)


def build_runtime_tab(bench: Workbench, concurrency_id: str) -> RuntimeTab:
    tab = RuntimeTab(**mask_layout(bench), **run_layout(bench))
    wire(tab, bench, concurrency_id)
    return tab
