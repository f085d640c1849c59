"""The headlab Gradio app. Start it with `headlab app` or `from app.main import launch; launch()`.

The app is a view: each tab reads its form defaults from the library's definitions (scorer fields,
`CurveConfig`, ablation-method fields, `MaskConfig`), calls one library function per button, and shows
the result's own `summary()`, `to_frame()` and `figure()`. Nothing here ranks, samples or tabulates.

Modules: `main` (Blocks and launch), one module per tab (`*_tab`, each a layout function and a wiring
function, and a `first_view` that fills the tab from stored results), `pool` (the shared models, one copy per name,
least recently used unloaded under a memory budget), `workbench` (each visitor's model, the running job's progress
and Cancel, stored runs; no gradio), `feedback` (handlers bound to the visitor's model, errors to `gr.Error`, the job
and read event groups), `views` (tables with CSV downloads, self-contained JSON downloads, linked per-head heatmaps:
a cell or row outlines a head and says what it holds), `page` (the browser side: heatmap clicks, the address bar,
stale results, the glossary), `needle_grid` (the Retrieval grid as a stored run), `inputs` (parsing what users type).
"""
