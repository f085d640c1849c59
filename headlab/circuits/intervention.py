"""Edit a sender head's output inside a subspace of the residual stream during the forward pass, and measure a task.

The sender's output is `o = z_h @ W_O[h]` (`z_h` from `blocks.{l}.attn.hook_z`). A hook on
`blocks.{l}.hook_attn_out` (the attention layer's summed output) replaces it by

    o - (1 - scale) · P (o - m)        P = Q Qᵀ, Q `[d_model, r]` orthonormal

with `m` the sender's mean output over the task's reference batch (`method="mean"`, the library's
default ablation) or 0 (`method="zero"`). `scale=0` removes what the sender writes in the subspace,
`scale=2` doubles it; everything outside the subspace and every other head is untouched. The
subspace edit reaches every later reader of those directions, not only the receiver: this is the
paper's intervention on the residual stream, not a weight edit of one receiver.

`channel_experiment` removes a report's channel (top-r directions by share) and compares it with
controls of the same rank: random r-dim subspaces of the sender's own output space (the row space
of its W_O, so a random control removes sender signal too, ~r/d_head of it), and the r directions
along which the sender's output varies most on the reference batch (the most output energy any
rank-r subspace can take away).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from headlab import store
from headlab.ablation.methods import DEFAULT_METHOD, Mean, Zero
from headlab.activations import Hook, act_name, capture
from headlab.heads import Head, head_label
from headlab.lab import Lab
from headlab.tasks import Task, make_task
from headlab.circuits.report import ChannelReport, group_label

METHODS = (Mean.name, Zero.name)  # the ablation methods a subspace edit applies: centred on the mean output, or not
CONTROLS = ("sender_space", "residual")
FORMAT = "headlab.channel_experiment/v1"
Progress = Callable[[float, str], None]


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"Channel edit method must be one of {', '.join(METHODS)}; got {method!r}.")


@dataclass(frozen=True)
class ChannelExperimentConfig:
    """What `channel_experiment` runs: the defaults every view (app, CLI, analyses) starts from.

    Fields:
        task, n: the task measured and its samples (when a name is given; a built `Task` keeps its own).
        ranks: channel ranks to test (None: the ranks holding 50% and 90% of the composition).
        n_random: random subspaces per rank, drawn as `control` says ("sender_space" or "residual"), seeded by `seed`.
        method: "mean" (edit around the sender's mean output) or "zero".
        scales: factors the largest-rank channel is also scaled by (0 = removed, 2 = doubled).
        top_variance: also remove the sender's highest-variance output directions of each rank.
    """

    task: str = "repeated_tokens"
    n: int | None = 8
    ranks: tuple[int, ...] | None = None
    n_random: int = 5
    seed: int = 0
    method: str = DEFAULT_METHOD
    control: str = "sender_space"
    scales: tuple[float, ...] = (0.5, 2.0)
    top_variance: bool = True

    def __post_init__(self):
        check_method(self.method)
        if self.control not in CONTROLS:
            raise ValueError(f"Random-subspace control must be one of {', '.join(CONTROLS)}; got {self.control!r}.")
        if int(self.n_random) < 0:
            raise ValueError(f"n_random must be 0 or more random subspaces per rank; got {self.n_random}.")
        if self.n is not None and int(self.n) < 1:
            raise ValueError(f"n must be at least 1 task sample; got {self.n}.")
        if self.ranks is not None and any(int(r) < 1 for r in self.ranks):
            raise ValueError(f"Channel ranks are whole numbers of directions >= 1; got {list(self.ranks)}.")


DEFAULTS = ChannelExperimentConfig()



def orthonormal(basis: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis `[d_model, r]` of the span of `basis`'s columns (they must be independent)."""
    basis = basis.detach().float().cpu()
    if basis.ndim != 2 or basis.shape[1] == 0:
        raise ValueError(f"A subspace basis is [d_model, r] with r >= 1; got shape {tuple(basis.shape)}.")
    q, r = torch.linalg.qr(basis)
    if (r.diagonal().abs() < 1e-6 * r.diagonal().abs().max()).any():
        raise ValueError("The subspace basis has dependent columns.")
    return q


@dataclass
class SenderStats:
    """The sender's output statistics on a task's reference batch.

    Attributes:
        mean_z: `[d_head]` mean of `hook_z` for the head over batch and positions.
        second_z: `[d_head, d_head]` mean of `z zᵀ`.
        W_O: `[d_head, d_model]` the head's output weights.
    """

    mean_z: torch.Tensor
    second_z: torch.Tensor
    W_O: torch.Tensor

    @property
    def mean_output(self) -> torch.Tensor:
        """`[d_model]` the head's mean contribution to the residual stream."""
        return self.mean_z @ self.W_O

    def _moment(self, centered: bool) -> torch.Tensor:
        return self.second_z - torch.outer(self.mean_z, self.mean_z) if centered else self.second_z

    def energy(self, basis: torch.Tensor, centered: bool = True) -> float:
        """Fraction of the head's output energy (variance when `centered`) inside the subspace `basis` `[d_model, r]`."""
        moment = self._moment(centered)
        inside = self.W_O @ basis  # [d_head, r]
        return float(torch.trace(inside.T @ moment @ inside) / torch.trace(self.W_O.T @ moment @ self.W_O))

    def top_variance(self, rank: int, centered: bool = True) -> torch.Tensor:
        """`[d_model, rank]`: the directions holding most of the head's output energy."""
        covariance = self.W_O.T @ self._moment(centered) @ self.W_O  # [d_model, d_model]
        _, vectors = torch.linalg.eigh(covariance)
        return vectors[:, -rank:].flip(1).contiguous()

    def write_space(self) -> torch.Tensor:
        """`[d_model, d_head]` orthonormal basis of the row space of W_O: everything the head can write."""
        return orthonormal(self.W_O.T)


@torch.no_grad()
def sender_stats(lab: Lab, task: Task, sender: Head) -> SenderStats:
    """Mean and second moment of the sender's `hook_z` on `task.reference_tokens()` (memoised on the task)."""
    layer, head = sender
    key = ("channel_z_moments", layer)
    if key not in task.memo:
        name = act_name("z", layer)
        z = capture(lab, task.reference_tokens(), [name])[name].float().cpu().flatten(0, 1)  # [batch * pos, head, d_head]
        task.memo[key] = (z.mean(0), torch.einsum("nhd,nhe->hde", z, z) / z.shape[0])
    mean, second = task.memo[key]
    return SenderStats(mean_z=mean[head], second_z=second[head], W_O=lab.model.W_O[layer, head].detach().float().cpu())


def channel_hooks(lab: Lab, sender: Head, basis: torch.Tensor, *, scale: float = 0.0, method: str = DEFAULT_METHOD,
                  task: Task | None = None) -> list[Hook]:
    """Forward hooks that scale the sender's output inside span(`basis` `[d_model, r]`) by `scale`.

    `method="mean"` keeps the sender's mean output in the subspace (needs `task` for its reference
    batch); `"zero"` scales the raw output. Returns TransformerLens `(hook_name, fn)` pairs.
    """
    check_method(method)
    if method == "mean" and task is None:
        raise ValueError("method='mean' needs a task: its reference batch defines the sender's mean output.")
    layer, head = sender
    q = orthonormal(basis).to(lab.device)
    W_O = lab.model.W_O[layer, head].detach()
    center = sender_stats(lab, task, sender).mean_output.to(lab.device) if method == "mean" else None
    grabbed: dict[str, torch.Tensor] = {}

    def grab_z(z: torch.Tensor, hook=None) -> torch.Tensor:
        grabbed["z"] = z[:, :, head]  # [batch, pos, d_head]
        return z

    def edit_output(out: torch.Tensor, hook=None) -> torch.Tensor:
        output = grabbed.pop("z") @ W_O.to(out.dtype)  # [batch, pos, d_model]
        if center is not None:
            output = output - center.to(out.dtype)
        basis_ = q.to(out.dtype)
        return out - (1.0 - scale) * ((output @ basis_) @ basis_.T)

    return [(act_name("z", layer), grab_z), (act_name("attn_out", layer), edit_output)]


def random_subspace(stats: SenderStats, rank: int, control: str, generator: torch.Generator) -> torch.Tensor:
    """A random `[d_model, rank]` orthonormal basis: inside the sender's write space or anywhere."""
    if control == "sender_space":
        space = stats.write_space()
        return orthonormal(space @ torch.randn(space.shape[1], rank, generator=generator))
    if control == "residual":
        return orthonormal(torch.randn(stats.W_O.shape[1], rank, generator=generator))
    raise ValueError(f"Random-subspace control must be one of {', '.join(CONTROLS)}; got {control!r}.")


@dataclass
class ChannelExperiment:
    """A task measured with the channel removed, vs random and top-variance subspaces of the same rank.

    Per rank r (index i of `ranks`): `channel[i]` the metric with the channel's top-r directions
    removed, `random[i]` one value per random subspace, `top_variance[i]` with the sender's r
    highest-variance output directions removed; `energy_*` the fraction of the sender's output
    variance each removed. `scaled[j]` is the metric with the rank-`scale_rank` channel scaled by `scales[j]`.
    """

    model: str
    sender: Head
    receivers: list[Head]
    kind: str
    fold_ln: bool
    task: dict
    metric: str
    higher_is_better: bool
    method: str
    control: str
    baseline: float
    head_removed: float
    ranks: list[int]
    shares: list[float]  # the composition share each rank's channel holds
    channel: list[float]
    random: list[list[float]]
    top_variance: list[float]
    energy_channel: list[float]
    energy_random: list[list[float]]
    energy_top_variance: list[float]
    scale_rank: int
    scales: list[float] = field(default_factory=list)
    scaled: list[float] = field(default_factory=list)
    seed: int = 0

    def damage(self, value: float) -> float:
        """How much worse `value` is than intact (positive = worse), in the metric's units."""
        return (self.baseline - value) if self.higher_is_better else (value - self.baseline)

    @property
    def label(self) -> str:
        return f"{head_label(*self.sender)} → {group_label(self.receivers)} ({self.kind.upper()}-composition)"

    def to_frame(self):
        """pandas, one row per rank: the metric and the output energy removed by the channel and the controls."""
        import pandas as pd

        rows = []
        for i, rank in enumerate(self.ranks):
            random = torch.tensor(self.random[i]) if self.random[i] else torch.tensor([float("nan")])
            rows.append({
                "rank": rank, "composition_share": round(self.shares[i], 3), "intact": round(self.baseline, 4),
                "channel_removed": round(self.channel[i], 4),
                "random_mean": round(float(random.mean()), 4),
                "random_max_damage": round(max(self.damage(v) for v in self.random[i]), 4) if self.random[i] else None,
                "top_variance_removed": round(self.top_variance[i], 4) if self.top_variance else None,
                "whole_head_removed": round(self.head_removed, 4),
                "energy_channel": round(self.energy_channel[i], 3),
                "energy_random_mean": round(float(torch.tensor(self.energy_random[i]).mean()), 3) if self.energy_random[i] else None,
                "energy_top_variance": round(self.energy_top_variance[i], 3) if self.energy_top_variance else None,
            })
        return pd.DataFrame(rows)

    def summary(self) -> str:
        lines = [f"**{self.label}** on **{self.task['task']}** ({self.metric}; intact {self.baseline:.3f}, "
                 f"whole sender {self.method}-ablated {self.head_removed:.3f}, damage {self.damage(self.head_removed):+.3f})."]
        for i, rank in enumerate(self.ranks):
            random = [self.damage(v) for v in self.random[i]]
            text = (f"- rank {rank} ({100 * self.shares[i]:.0f}% of the composition): channel removed → {self.channel[i]:.3f} "
                    f"(damage {self.damage(self.channel[i]):+.3f}, {100 * self.energy_channel[i]:.0f}% of the sender's output variance)")
            if random:
                text += (f"; {len(random)} random {self.control.replace('_', '-')} subspaces: damage {sum(random) / len(random):+.3f} "
                         f"on average, at most {max(random):+.3f}")
            if self.top_variance:
                text += (f"; top-variance subspace: damage {self.damage(self.top_variance[i]):+.3f} "
                         f"({100 * self.energy_top_variance[i]:.0f}% of the variance)")
            lines.append(text + ".")
        if self.scales:
            scaled = ", ".join(f"×{s:g} → {v:.3f}" for s, v in zip(self.scales, self.scaled))
            lines.append(f"- rank-{self.scale_rank} channel scaled: {scaled}.")
        return "\n".join(lines)

    def figure(self):
        """Plotly: the metric per rank for the channel, each random subspace and the top-variance subspace."""
        import plotly.graph_objects as go

        fig = go.Figure()
        xs = [str(r) for r in self.ranks]
        rand_x = [str(r) for r, values in zip(self.ranks, self.random) for _ in values]
        rand_y = [v for values in self.random for v in values]
        fig.add_trace(go.Scatter(x=rand_x, y=rand_y, mode="markers", marker={"color": "grey", "size": 8, "opacity": 0.6},
                                 name=f"random {self.control.replace('_', '-')} subspaces"))
        if self.top_variance:
            fig.add_trace(go.Scatter(x=xs, y=self.top_variance, mode="markers", marker={"color": "royalblue", "size": 11, "symbol": "diamond"},
                                     name="sender's top-variance subspace"))
        fig.add_trace(go.Scatter(x=xs, y=self.channel, mode="markers+lines", marker={"color": "crimson", "size": 12},
                                 name="channel removed"))
        fig.add_hline(y=self.baseline, line_dash="dot", annotation_text="intact")
        fig.add_hline(y=self.head_removed, line_dash="dash", line_color="black", annotation_text="whole sender removed")
        fig.update_layout(title=f"Removing the channel vs same-rank controls — {self.label}", xaxis_title="rank of the removed subspace",
                          yaxis_title=self.metric, xaxis={"type": "category"}, height=420)
        return fig

    def save(self, path: Path) -> Path:
        store.write_json(path, {"format": FORMAT, "record": "channel_experiment", "kind": self.kind, "params": self.params(),
                                "experiment": asdict(self)})
        return path

    def params(self) -> dict:
        return experiment_params(self.sender, self.receivers, self.kind, self.fold_ln, self.task, self.ranks, len(self.random[0]) if self.random else 0,
                                 self.seed, self.method, self.control, self.scales, bool(self.top_variance))

    @classmethod
    def load(cls, path: Path | str) -> "ChannelExperiment":
        record = store.read_record(path, FORMAT, "channel-experiment")
        fields = record["experiment"]
        fields["sender"] = tuple(fields["sender"])
        fields["receivers"] = [tuple(r) for r in fields["receivers"]]
        return cls(**fields)


def experiment_params(sender, receivers, kind, fold_ln, task: dict, ranks, n_random, seed, method, control, scales, top_variance) -> dict:
    return {"sender": list(sender), "receivers": [list(r) for r in receivers], "kind": kind, "fold_ln": fold_ln, "task": task,
            "ranks": list(ranks), "n_random": n_random, "seed": seed, "method": method, "control": control,
            "scales": list(scales), "top_variance": top_variance}


def experiment_path(lab: Lab, report: ChannelReport, task: Task, config: ChannelExperimentConfig, ranks: list[int]) -> Path:
    """Where the experiment is stored: keyed by the pair, the task's description and the resolved config."""
    params = experiment_params(report.sender, report.receivers, report.kind, report.fold_ln, task.describe(), ranks,
                               config.n_random, config.seed, config.method, config.control, [float(s) for s in config.scales],
                               config.top_variance)
    return store.run_path(lab.info.slug, "channel-experiment", params)


def channel_experiment(
    lab: Lab,
    report: ChannelReport,
    task: str | Task | None = None,
    *,
    task_params: dict | None = None,
    recompute: bool = False,
    save: bool = True,
    progress: Progress | None = None,
    **params,
) -> ChannelExperiment:
    """Remove `report`'s channel from the sender's output and compare with same-rank controls on `task`.

    `params`: the `ChannelExperimentConfig` fields (ranks, n_random, seed, method, control, scales,
    top_variance, n), its defaults otherwise; `task` a name (default the config's) or a built `Task`.
    Stored in `cached_runs/` like ablation curves and read back unless `recompute`.
    """
    config = ChannelExperimentConfig(**({"task": task} if isinstance(task, str) else {}), **params)
    if not isinstance(task, Task):
        task = make_task(config.task, lab, n=config.n, seed=config.seed, **(task_params or {}))
    ranks = sorted({int(r) for r in (config.ranks or [report.n_directions(0.5), report.n_directions(0.9)])})
    for rank in ranks:
        report.channel_indices(rank=rank)  # validates the rank
    return store.cached_run(experiment_path(lab, report, task, config, ranks), ChannelExperiment.load,
                            lambda: _run_experiment(lab, report, task, config, ranks, progress), recompute=recompute, save=save)


class _Steps:
    """Evaluates the task under hooks and reports progress over a known number of steps."""

    def __init__(self, task: Task, total: int, progress: Progress | None):
        self.task, self.total, self.done, self.progress = task, total, 0, progress

    def tick(self, what: str) -> None:
        self.done += 1
        if self.progress:
            self.progress(self.done / self.total, f"{what} ({self.done}/{self.total})")

    def run(self, hooks: list[Hook], what: str) -> float:
        value = self.task.evaluate(hooks)
        self.tick(what)
        return value


def _measure_rank(steps: _Steps, report: ChannelReport, stats: SenderStats, edit, rank: int,
                  config: ChannelExperimentConfig) -> dict:
    """One rank: the channel, `n_random` random subspaces and the top-variance subspace removed, with their energies."""
    centered = config.method == "mean"
    indices = report.channel_indices(rank=rank)
    basis = report.directions[:, indices]
    generator = torch.Generator().manual_seed(1_000_003 * config.seed + rank)
    bases = [random_subspace(stats, rank, config.control, generator) for _ in range(config.n_random)]
    row = {
        "share": float(report.share[indices].sum()),
        "channel": steps.run(edit(basis), f"rank-{rank} channel removed"),
        "energy_channel": stats.energy(basis, centered),
        "random": [steps.run(edit(b), f"random rank-{rank} subspace {i + 1}") for i, b in enumerate(bases)],
        "energy_random": [stats.energy(b, centered) for b in bases],
    }
    if config.top_variance:
        top_basis = stats.top_variance(rank, centered)
        row["top_variance"] = steps.run(edit(top_basis), f"rank-{rank} top-variance subspace removed")
        row["energy_top_variance"] = stats.energy(top_basis, centered)
    return row


def _run_experiment(lab: Lab, report: ChannelReport, task: Task, config: ChannelExperimentConfig, ranks: list[int],
                    progress: Progress | None) -> ChannelExperiment:
    scales = [float(s) for s in config.scales]
    steps = _Steps(task, 3 + len(ranks) * (1 + config.n_random + int(config.top_variance)) + len(scales), progress)
    if progress:
        progress(0.0, "sender statistics on the reference batch")
    stats = sender_stats(lab, task, report.sender)
    steps.tick("sender statistics")

    def edit(basis: torch.Tensor, scale: float = 0.0) -> list[Hook]:
        return channel_hooks(lab, report.sender, basis, scale=scale, method=config.method, task=task)

    baseline = steps.run([], "intact")
    head_removed = steps.run(edit(stats.write_space()), "whole sender removed")
    rows = [_measure_rank(steps, report, stats, edit, rank, config) for rank in ranks]
    scale_rank = ranks[-1]
    scale_basis = report.directions[:, report.channel_indices(rank=scale_rank)]
    scaled = [steps.run(edit(scale_basis, s), f"rank-{scale_rank} channel ×{s:g}") for s in scales]
    column = lambda name: [row[name] for row in rows if name in row]  # noqa: E731
    return ChannelExperiment(
        model=lab.info.name, sender=report.sender, receivers=report.receivers, kind=report.kind, fold_ln=report.fold_ln,
        task=task.describe(), metric=task.metric, higher_is_better=task.higher_is_better, method=config.method,
        control=config.control, baseline=baseline, head_removed=head_removed, ranks=ranks, shares=column("share"),
        channel=column("channel"), random=column("random"), top_variance=column("top_variance"),
        energy_channel=column("energy_channel"), energy_random=column("energy_random"),
        energy_top_variance=column("energy_top_variance"), scale_rank=scale_rank, scales=scales, scaled=scaled,
        seed=config.seed,
    )
