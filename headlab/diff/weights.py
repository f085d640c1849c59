"""Where fine-tuning changed the weights: per head (QK and OV circuits), per MLP, per parameter.

A head's circuits are TransformerLens `FactoredMatrix`es, as `headlab.circuits.weights` builds them
(ln1 folded into W_Q, W_K, W_V; query head h reads KV head h // group; un-rotated W_Q W_K^T, the QK
form at relative offset 0):

    QK = W_Q W_K^T        OV = W_V W_O        (each [d_model, d_model], rank <= d_head)

The relative change of a circuit from model A to model B is ||C_B - C_A||_F / ||C_A||_F. The
difference is factored exactly, never expanded to d_model x d_model:

    C_B - C_A = A_B B_B - A_A B_A = A_B (B_B - B_A) + (A_B - A_A) B_A = [A_B, dA] @ [dB; B_A]

so its Frobenius norm is a `FactoredMatrix` norm of rank <= 2 d_head (computed in float64). A head
whose four factors are bit-identical in both models gets exactly 0, not float noise.

An MLP's change is ||W_B - W_A||_F / ||W_A||_F over all its parameters together (gate, up, down, ...:
every parameter of the bridge's `blocks[l].mlp`). `parameter_change` gives the same ratio for every
parameter of the model, which says where a change sits (a LoRA merged into q/k/v/o and the MLP
projections changes those and nothing else).
"""
from __future__ import annotations

import re

import torch
from transformer_lens import FactoredMatrix

from headlab.circuits.weights import folded_weights
from headlab.lab import Lab

CIRCUITS = ("qk", "ov")
SHAPE_FIELDS = ("n_layers", "n_heads", "n_kv_heads", "d_head", "d_model", "d_vocab")
_WRAPPER = re.compile(r"\._original_component")  # the bridge's wrapper level in parameter names
_LAYER = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


class ShapeMismatch(ValueError):
    """Two models that cannot be compared head by head."""


def check_same_shape(lab_a: Lab, lab_b: Lab) -> None:
    """Raise `ShapeMismatch` naming every shape fact (and parameter) where the two models differ."""
    a, b = lab_a.info, lab_b.info
    differ = [f"{f} {getattr(a, f)} vs {getattr(b, f)}" for f in SHAPE_FIELDS if getattr(a, f) != getattr(b, f)]
    if not differ:
        shapes_a, shapes_b = _parameter_shapes(lab_a), _parameter_shapes(lab_b)
        differ = [f"parameter {name}" for name in sorted(set(shapes_a) ^ set(shapes_b))][:3]
        differ += [f"{name} {list(shapes_a[name])} vs {list(shapes_b[name])}"
                   for name in sorted(set(shapes_a) & set(shapes_b)) if shapes_a[name] != shapes_b[name]][:3]
    if differ:
        raise ShapeMismatch(
            f"Cannot diff {a.name} and {b.name}: they differ in shape ({'; '.join(differ)}). hl.diff compares two "
            "models of the same architecture and size, head by head (e.g. a model and its fine-tune).")


def parameter_name(name: str) -> str:
    """A transformers parameter name without the bridge's wrapper levels: `model.layers.0.self_attn.q_proj.weight`."""
    return _WRAPPER.sub("", name)


def _parameter_shapes(lab: Lab) -> dict[str, torch.Size]:
    return {parameter_name(n): p.shape for n, p in lab.hf_model.named_parameters()}


def relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    """||b - a||_F / ||a||_F in float64 (0 when identical; inf when `a` is zero and `b` is not)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    delta = float((b - a).norm())
    return 0.0 if delta == 0 else delta / float(a.norm())


def parameter_change(lab_a: Lab, lab_b: Lab) -> list[dict]:
    """One row per parameter: `name`, `layer` (None outside the blocks), `module` (the name without the layer
    prefix, e.g. `self_attn.q_proj.weight`) and `change` (relative Frobenius change from A to B)."""
    params_b = {parameter_name(n): p for n, p in lab_b.hf_model.named_parameters()}
    rows = []
    for raw, weight in lab_a.hf_model.named_parameters():
        name = parameter_name(raw)
        match = _LAYER.search(name)
        layer = int(match.group(1)) if match else None
        module = name[match.end():] if match else name
        rows.append({"name": name, "layer": layer, "module": module, "change": relative_change(weight, params_b[name])})
    return rows


def mlp_change(lab_a: Lab, lab_b: Lab) -> torch.Tensor:
    """`[n_layers]`: relative Frobenius change of each block's MLP parameters taken together."""
    out = torch.zeros(lab_a.info.n_layers, dtype=torch.float64)
    for layer in range(lab_a.info.n_layers):
        pairs = zip(lab_a.model.blocks[layer].mlp.parameters(), lab_b.model.blocks[layer].mlp.parameters())
        delta = base = 0.0
        for wa, wb in pairs:
            wa, wb = wa.detach().double().cpu(), wb.detach().double().cpu()
            delta += float((wb - wa).pow(2).sum())
            base += float(wa.pow(2).sum())
        out[layer] = 0.0 if delta == 0 else (delta / base) ** 0.5
    return out.float()


def _circuit(lab: Lab, circuit: str) -> FactoredMatrix:
    """Every head's `circuit` ("qk" or "ov") as one `FactoredMatrix` `[layer, head, d_model, d_model]`."""
    weights = folded_weights(lab)
    return weights.all_readers("q") if circuit == "qk" else weights.all_ov()


def circuit_change(lab_a: Lab, lab_b: Lab, circuit: str) -> torch.Tensor:
    """`[n_layers, n_heads]`: ||C_B - C_A||_F / ||C_A||_F of each head's `circuit` ("qk" or "ov")."""
    if circuit not in CIRCUITS:
        raise ValueError(f"circuit must be one of {', '.join(CIRCUITS)}; got {circuit!r}.")
    fa, fb = _circuit(lab_a, circuit), _circuit(lab_b, circuit)
    out = torch.zeros(lab_a.info.n_layers, lab_a.info.n_heads, dtype=torch.float64)
    for layer in range(lab_a.info.n_layers):  # one layer at a time: [head, d_model, 2 d_head] in float64
        a_a, b_a, a_b, b_b = (m[layer].double() for m in (fa.A, fa.B, fb.A, fb.B))
        d_a, d_b = a_b - a_a, b_b - b_a
        changed = d_a.flatten(1).ne(0).any(1) | d_b.flatten(1).ne(0).any(1)  # [head]
        if not changed.any():
            continue  # bit-identical heads: exactly 0, no SVD needed
        delta = FactoredMatrix(torch.cat([a_b, d_a], -1), torch.cat([d_b, b_a], -2)).norm()
        base = FactoredMatrix(a_a, b_a).norm()
        out[layer] = torch.where(changed, delta / base, torch.zeros_like(delta))
    return out.float()
