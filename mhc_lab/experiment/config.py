"""Typed, validated configuration: one pydantic model per section of an experiment file.

Every field carries a description; unknown keys are rejected. The JSON Schema published in
`mhc_lab/experiment/schema/experiment.schema.json` is generated from these classes (`mhc-lab schema`).
Loading a file and turning errors into one-line messages lives in `loader.py`.
"""

from __future__ import annotations

import glob
import math
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Connection = Literal["residual", "hc", "mhc", "mhc_lite", "kromhc", "ortho"]
CONNECTIONS: tuple[str, ...] = ("residual", "hc", "mhc", "mhc_lite", "kromhc", "ortho")
# mHC with an exact doubly-stochastic H_res instead of Sinkhorn-Knopp (nn/variants.py)
EXACT_VARIANTS: tuple[str, ...] = ("mhc_lite", "kromhc", "ortho")
MAX_LITE_STREAMS = 6  # mhc_lite: n! logits per token (n = 8 would need 40320)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    """Where the training bytes come from (byte-level, vocabulary 256)."""

    source: Literal["stdlib"] = Field(
        "stdlib",
        description="Built-in corpus: the Python standard library's own source files, read in "
        "sorted order (no download). Ignored when `path` is set.",
    )
    path: Optional[str] = Field(
        None,
        description="A file, folder or glob of files to read as bytes instead of the built-in "
        "corpus. Relative paths are relative to the experiment file.",
    )
    max_bytes: int = Field(
        4_000_000, ge=10_000, description="Read at most this many bytes of the corpus."
    )
    val_fraction: float = Field(
        0.1,
        gt=0.0,
        lt=0.5,
        description="The fraction of the corpus held out for validation and the probe (see "
        "val_split).",
    )
    val_split: Literal["tail", "hashed"] = Field(
        "tail",
        description="Which bytes are held out: `tail` = the last val_fraction of the corpus "
        "(files in sorted order, so the alphabetically last files); `hashed` = whole files, "
        "chosen by a stable hash of their path, about val_fraction of them, so validation "
        "text is drawn like training text.",
    )


def user_files(path: str, base_dir: Optional[Path] = None) -> list[Path]:
    """The files named by `path`: a file, a folder (all files below it) or a glob; sorted."""
    p = Path(path).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file())
    return sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())


class ModelConfig(Section):
    """The decoder-only byte-level transformer and its residual path (DESIGN.md section 2)."""

    d_model: int = Field(64, ge=8, le=8192, description="Width C of each residual stream.")
    heads: int = Field(4, ge=1, description="Attention heads; must divide d_model.")
    depth: int = Field(
        12, ge=1, le=512, description="Transformer blocks; each is two layers (attention, MLP)."
    )
    mlp_ratio: int = Field(4, ge=1, le=16, description="MLP hidden width = mlp_ratio * d_model.")
    connection: Connection = Field(
        "mhc",
        description="Residual path: `residual` (x + F(x)), `hc`, `mhc` (Sinkhorn-Knopp), or an "
        "mHC variant whose H_res is exactly doubly stochastic: `mhc_lite` (convex combination of "
        "the n! permutations, n <= 6), `kromhc` (Kronecker product of 2x2 factors, n a power of "
        "2), `ortho` (entrywise square of a Cayley-transform orthogonal matrix).",
    )
    n_streams: int = Field(
        4,
        ge=1,
        le=8,
        description="Expansion rate n of HC and mHC (forced to 1 for `residual`).",
    )
    hc_dynamic: bool = Field(
        True, description="HC only: dynamic (input-dependent) coefficients; false = static HC."
    )
    hc_tanh: bool = Field(True, description="HC only: tanh on the dynamic terms (HC paper).")
    sinkhorn_iters: int = Field(
        20,
        ge=0,
        le=1000,
        description="mHC only: Sinkhorn-Knopp iterations t_max (paper: 20); 0 = unconstrained "
        "exp(logits), the ablation.",
    )
    mhc_init_logit: float = Field(
        2.0,
        ge=0.0,
        le=20.0,
        description="mHC and its variants: strength s of the bias initialisation. b_res = -s off "
        "the diagonal and 0 on it (after Sinkhorn the diagonal is e^s / (e^s + n - 1), 0.711 for "
        "s = 2, n = 4); b_pre = +s for stream k mod n and -s for the others; b_post = 0 "
        "(H_post = 1). Larger s starts nearer the identity but slows Sinkhorn-Knopp's "
        "convergence: 20 iterations leave larger column errors once training moves the logits. "
        "The variants start from the same H_res diagonal (mhc_lite and ortho from the same "
        "matrix; docs/design.md).",
    )
    sinkhorn_tol: Optional[float] = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="mHC only: null = the paper's fixed t_max iterations. Set: iterate until "
        "every column sum of every token's H_res is within this of 1, at most sinkhorn_iters "
        "iterations (Sinkhorn to convergence; a departure from the paper).",
    )
    norm_eps: float = Field(1e-6, gt=0.0, lt=1.0, description="RMSNorm epsilon (all norms).")

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelConfig":
        if self.d_model % self.heads != 0:
            raise ValueError(
                f"heads ({self.heads}) must divide d_model ({self.d_model})"
            )
        if self.connection == "residual" and self.n_streams != 1:
            object.__setattr__(self, "n_streams", 1)
        n = self.n_streams
        if self.connection == "mhc_lite" and n > MAX_LITE_STREAMS:
            raise ValueError(
                f"mhc_lite builds H_res from all n! permutations: n_streams must be at most "
                f"{MAX_LITE_STREAMS} (got {n}, {math.factorial(n)} logits per token)"
            )
        if self.connection == "kromhc" and n & (n - 1):
            raise ValueError(f"kromhc builds H_res from 2x2 factors: n_streams must be a power of 2 (got {n})")
        if self.connection == "mhc" and self.sinkhorn_tol is not None and self.sinkhorn_iters == 0:
            raise ValueError("sinkhorn_tol needs sinkhorn_iters >= 1 (its cap)")
        return self

    @property
    def layers(self) -> int:
        """Number of layers L (sublayers): two per block, as the mHC paper counts them."""
        return 2 * self.depth


class TrainConfig(Section):
    """Optimisation: AdamW with warmup and a decay schedule."""

    steps: int = Field(300, ge=1, description="Optimiser steps.")
    batch_size: int = Field(16, ge=1, description="Sequences per step.")
    seq_len: int = Field(128, ge=2, le=65536, description="Tokens (bytes) per sequence.")
    lr: float = Field(3e-3, gt=0.0, le=10.0, description="Peak learning rate.")
    warmup: int = Field(20, ge=0, description="Linear warmup steps.")
    schedule: Literal["cosine", "step", "constant"] = Field(
        "cosine",
        description="After warmup: `cosine` to min_lr_ratio * lr; `step` = the mHC paper's "
        "x0.316 at 80% and x0.1 at 90% of steps; `constant`.",
    )
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Cosine floor as a fraction of lr.")
    weight_decay: float = Field(
        0.1,
        ge=0.0,
        description="AdamW weight decay on matrices; static HC/mHC parameters, biases, gates "
        "and norms get none.",
    )
    beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW beta1.")
    beta2: float = Field(0.95, ge=0.0, lt=1.0, description="AdamW beta2.")
    grad_clip: Optional[float] = Field(
        None, gt=0.0, description="Clip the global gradient norm to this value; null = off. "
        "The logged gradient norm is always the one before clipping."
    )
    diverge_factor: Optional[float] = Field(
        2.0,
        gt=1.0,
        description="Stop the run as `diverged` when the training loss exceeds this multiple "
        "of its first value; null = only non-finite loss or gradient counts.",
    )
    log_every: int = Field(1, ge=1, description="Write a metrics line every N steps.")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="`auto` picks CUDA, then MPS, then CPU."
    )
    threads: Optional[int] = Field(
        None, ge=1, description="CPU threads for torch; null = all cores of this machine."
    )
    compile: bool = Field(
        False,
        description="Wrap the model in torch.compile (on CPU the compiled graph calls the same "
        "native kernels as eager runs, as custom ops; compiling a 90-layer model takes minutes, "
        "so it pays only for long runs: BENCHMARKS.md).",
    )
    autocast_bf16: bool = Field(
        False, description="bf16 autocast on CUDA (ignored on CPU); the gain is always float64."
    )

    @model_validator(mode="after")
    def _check_warmup(self) -> "TrainConfig":
        if self.warmup >= self.steps and self.steps > 1:
            raise ValueError(f"warmup ({self.warmup}) must be smaller than steps ({self.steps})")
        return self


class ProbeConfig(Section):
    """The gain probe: a fixed held-out sequence, the same tokens at every probe."""

    every: int = Field(25, ge=1, description="Probe every N steps (step 0 and the last step always).")
    val_batches: int = Field(
        4, ge=1, description="Validation batches (of train.batch_size) for val_loss at each probe."
    )
    checkpoint: bool = Field(
        True,
        description="Save a resumable checkpoint at each probe (deleted when the run ends).",
    )


class SweepConfig(Section):
    """Which runs to make from the base config: a grid, a list of points, or both."""

    grid: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="Cartesian product over dotted keys, e.g. `model.depth: [6, 12]`.",
    )
    points: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Explicit override sets, e.g. `[{model.connection: hc, train.lr: 0.01}]`. "
        "With a grid, every point is combined with every grid cell.",
    )


class RunConfig(Section):
    """Everything one training run needs: the fully resolved config stored beside its results."""

    seed: int = Field(0, ge=0, description="Seeds initialisation and data order.")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)


class LauncherConfig(Section):
    """Where the runs of a sweep execute. Never part of a run's id or of resolved.yaml: it says
    where runs train, not what they compute, so changing it keeps every finished result."""

    kind: Literal["local", "slurm", "submitit-local"] = Field(
        "local",
        description="`local`: this machine, `workers` runs at once; `slurm`: one Slurm job per "
        "pending run (a job array, through submitit); `submitit-local`: the same submitit path "
        "with jobs as local processes (rehearse a Slurm setup without a cluster).",
    )
    workers: int = Field(
        1,
        ge=1,
        le=256,
        description="local: runs trained at once, each in its own process, the CPU cores split "
        "between them unless train.threads is set (ignored by the submitit kinds).",
    )
    partition: Optional[str] = Field(
        None, description="slurm: the partition (sbatch --partition); null = the cluster's default."
    )
    time_min: int = Field(
        60,
        ge=1,
        description="slurm, submitit-local: time limit of each job in minutes; on Slurm a job "
        "stopped by it (or preempted) is requeued, up to 3 times, and its run resumes from its "
        "last checkpoint.",
    )
    gpus_per_node: int = Field(0, ge=0, le=64, description="slurm: GPUs per job (one run uses one device).")
    cpus_per_task: Optional[int] = Field(
        None, ge=1, description="slurm: CPU cores per job; torch uses them all unless train.threads "
        "is set; null = the cluster's default."
    )
    mem_gb: Optional[float] = Field(None, gt=0, description="slurm: memory per job in GB; null = the cluster's default.")
    array_parallelism: int = Field(
        64, ge=1, description="slurm: at most this many jobs of the array run at once."
    )
    setup: list[str] = Field(
        default_factory=list,
        description="slurm: shell lines run before each job, e.g. `module load cuda` or "
        "`source ~/venv/bin/activate`.",
    )
    sbatch: dict[str, Any] = Field(
        default_factory=dict,
        description="slurm: further #SBATCH options, e.g. `{account: myproject, qos: high}` "
        "(submitit's slurm_additional_parameters).",
    )
    log_folder: Optional[str] = Field(
        None,
        description="submitit's job files and logs; null = <out>/<name>/jobs. Relative paths are "
        "relative to the experiment file.",
    )
    poll_s: float = Field(
        5.0, gt=0.0, le=600.0, description="submitit kinds: how often a waiting `mhc-lab run` "
        "reads the jobs' results files to show progress."
    )


class WandbConfig(Section):
    """Weights & Biases: one W&B run per mhc-lab run (training/loggers/wandb_logger.py)."""

    project: str = Field("mhc-lab", min_length=1, description="W&B project.")
    entity: Optional[str] = Field(None, description="W&B entity (user or team); null = your default.")
    mode: Literal["online", "offline"] = Field(
        "offline",
        description="`offline`: write under <run>/wandb/ only (upload later with `wandb sync`); "
        "`online`: stream to the W&B server.",
    )
    tags: list[str] = Field(
        default_factory=list, description="Extra tags; the run's connection is always one."
    )


class LoggingConfig(Section):
    """Live logging to W&B and TensorBoard, beside the results folder (which stays the source
    of truth). Never part of a run's id or of resolved.yaml, like `launcher`."""

    wandb: Optional[WandbConfig] = Field(
        None,
        description="W&B settings; null = off, `true` or `{}` = on with the defaults below "
        "(`pip install -e \".[wandb]\"`).",
    )
    tensorboard: bool = Field(
        False,
        description="Write TensorBoard event files under <run>/tb/; `tensorboard --logdir "
        "results/<name>` shows the sweep (`pip install -e \".[tensorboard]\"`).",
    )

    @field_validator("wandb", mode="before")
    @classmethod
    def _wandb_switch(cls, value: Any) -> Any:
        """`wandb: true` = on with the defaults, `wandb: false` = off."""
        if value is True:
            return {}
        if value is False:
            return None
        return value


class ExperimentConfig(RunConfig):
    """An experiment file: a named base run config and a sweep over it."""

    name: str = Field(
        ...,
        min_length=1,
        max_length=100,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Results go to <out>/<name>/. Letters, digits, '.', '_', '-'.",
    )
    description: str = Field("", description="Free text, copied into the report.")
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    launcher: LauncherConfig = Field(default_factory=LauncherConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    def base_run(self) -> dict[str, Any]:
        """The base run config as a plain dict (without name, description, sweep, launcher and
        logging)."""
        return self.model_dump(exclude={"name", "description", "sweep", "launcher", "logging"})


# Fields that do not change a run of the given connection; left out of its run_id hash.
IRRELEVANT_MODEL_FIELDS: dict[str, set[str]] = {
    "residual": {"n_streams", "hc_dynamic", "hc_tanh", "sinkhorn_iters", "sinkhorn_tol", "mhc_init_logit"},
    "hc": {"sinkhorn_iters", "sinkhorn_tol", "mhc_init_logit"},
    "mhc": {"hc_dynamic", "hc_tanh"},
    **{v: {"hc_dynamic", "hc_tanh", "sinkhorn_iters", "sinkhorn_tol"} for v in EXACT_VARIANTS},
}
# Fields added after results were committed, left out of the run_id hash at these values
# (their defaults, the behaviour before they existed), so every earlier run keeps its id.
LATER_FIELDS: dict[str, Any] = {"model.sinkhorn_tol": None, "data.val_split": "tail"}


def reference_markdown() -> str:
    """The experiment-file reference as Markdown tables (docs/experiment-file.md embeds this verbatim)."""
    sections = [
        ("top level", ExperimentConfig, ("data", "model", "train", "probe", "sweep", "launcher", "logging")),
        ("data", DataConfig, ()),
        ("model", ModelConfig, ()),
        ("train", TrainConfig, ()),
        ("probe", ProbeConfig, ()),
        ("sweep", SweepConfig, ()),
        ("launcher", LauncherConfig, ()),
        ("logging", LoggingConfig, ()),
        ("logging.wandb", WandbConfig, ()),
    ]
    lines: list[str] = []
    for title, cls, skip in sections:
        lines += [f"**{title}**", "", "| key | default | meaning |", "|---|---|---|"]
        for name, info in cls.model_fields.items():
            if name in skip:
                continue
            default = "required" if info.is_required() else repr(info.get_default(call_default_factory=True))
            default = default.replace("None", "null").replace("True", "true").replace("False", "false")
            lines.append(f"| `{name}` | `{default}` | {info.description} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
