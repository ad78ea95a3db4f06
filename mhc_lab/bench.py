"""Training-step benchmark: residual vs HC vs mHC (and, if installed, a peer implementation).

Legend: B = batch, T = tokens (seq_len), n = residual streams, C = d_model.

One "step" is what the training loop does per optimiser step: zero_grad, forward with loss,
backward, the gradient norm the trainer logs (`nn.model.gradient_norm`, no clip), AdamW
step. For every d_model all variants are built first, then warmed up, then
timed *interleaved*: repetition i times one step of every variant, in an order rotated by i,
so machine noise (other jobs, frequency changes) hits all variants alike. The reported time is
the median over repetitions; the ratio to residual is the median of the per-repetition ratios
(each ratio taken between steps measured moments apart). On a machine shared with other jobs,
`threads=1` keeps the ratios stable: with every core asked for, OpenMP waits on the busy
cores make all steps several times slower and noisy.

Memory, measured after timing, one extra step per variant:

- `peak_mb`: on CUDA, torch.cuda.max_memory_allocated during the step minus the memory
  allocated before it (activations, gradients and temporaries; parameters and optimiser state
  excluded). On Linux CPU, the process's peak resident set size (VmHWM, reset through
  /proc/self/clear_refs) during the step minus the resident size before it, after returning
  freed heap memory to the OS (malloc_trim): the same quantity as seen by the OS, coarser
  (page granularity, allocator caching). None where neither is available.
- `saved_mb`: bytes of the tensors autograd saves for backward during the forward (distinct
  storages), counted through torch.autograd.graph.saved_tensors_hooks: exact and
  device-independent, the activation memory that depth and Sinkhorn iterations multiply.

With `compile=True` every variant (the residual and the peer rows too, so the ratios compare
compiled with compiled) is wrapped in `torch.compile` (default mode, as `train.compile`). The
first step of each variant, which compiles its forward and backward graphs, is timed on its
own (`compile_s`) and never counted in the step times; `warmup` further untimed steps follow.
Dynamo's caches are reset before each width, so every width compiles with static shapes.

The peer is lucidrains' `hyper-connections` package (PyPI 0.4.11, the `peer` extra): its
HyperConnections and ManifoldConstrainedHyperConnections wrapped around the same sublayers,
embeddings and head as ours, with its streams folded into the batch dimension as it expects.
"""

from __future__ import annotations

import ctypes
import gc
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .nn import native
from .experiment.config import ModelConfig
from .errors import MhcLabError
from .nn.model import LanguageModel, build_model, gradient_norm

if TYPE_CHECKING:
    from rich.table import Table

OWN_VARIANTS: tuple[str, ...] = ("residual", "hc", "mhc")
# The exact doubly-stochastic mHC variants (nn/variants.py); `--exact` (the default) adds them.
EXACT_VARIANTS: tuple[str, ...] = ("mhc_lite", "kromhc", "ortho")
PEAK_MEANING = {
    "cuda": "torch.cuda.max_memory_allocated during one step minus memory allocated before it",
    "cpu": "peak resident set size (VmHWM) during one step minus the resident size before it, "
    "after malloc_trim (Linux; n/a elsewhere)",
}
PEER_VARIANTS: tuple[str, ...] = ("peer-hc", "peer-mhc")


# Named shapes (`mhc-lab bench --preset NAME`); options given explicitly override them.
PRESETS: dict[str, dict[str, Any]] = {
    # experiments/divergence.yaml: 45 blocks (90 layers), d_model 64, batch 16 x 64 bytes
    "headline": {"d_models": [64], "depth": 45, "batch": 16, "seq_len": 64},
    # every round's full table (BENCHMARKS.md): the BenchSettings defaults
    "reference": {"d_models": [64, 256, 512], "depth": 12, "batch": 16, "seq_len": 128},
}


@dataclass
class BenchSettings:
    """What to measure. The defaults are the `reference` preset's shapes."""

    d_models: list[int] = field(default_factory=lambda: [64, 256, 512])
    depth: int = 12  # transformer blocks (2 layers each)
    n_streams: int = 4
    seq_len: int = 128
    batch: int = 16
    steps: int = 10  # timed repetitions (each times one step of every variant)
    warmup: int = 3  # untimed steps per variant before timing
    sinkhorn_iters: int = 20
    peer: bool = True  # add the hyper-connections package's rows when it is importable
    exact: bool = True  # add rows for the exact mHC variants (mhc_lite, kromhc, ortho)
    device: str = "auto"  # auto | cpu | cuda | mps
    threads: Optional[int] = None  # torch CPU threads during the run; None = leave as is
    compile: bool = False  # wrap every variant's model in torch.compile before timing
    seed: int = 0
    preset: Optional[str] = None  # the PRESETS name the shapes came from, for the record

    @classmethod
    def from_preset(cls, preset: Optional[str], **given: Any) -> "BenchSettings":
        """Settings from a PRESETS name (or None), with every non-None value of `given` on
        top; MhcLabError for an unknown name."""
        if preset is not None and preset not in PRESETS:
            raise MhcLabError(f"--preset {preset}: choose one of {', '.join(PRESETS)}")
        values = {**(PRESETS[preset] if preset else {}), **{k: v for k, v in given.items() if v is not None}}
        return cls(**values, preset=preset)

    def check(self) -> None:
        """Raise MhcLabError naming the option to fix."""
        if not self.d_models:
            raise MhcLabError("--d-model: give at least one width")
        for d in self.d_models:
            if d < 8 or d % 4:
                raise MhcLabError(f"--d-model {d}: must be >= 8 and divisible by 4 (heads)")
        for name in ("depth", "n_streams", "batch", "steps"):
            if getattr(self, name) < 1:
                raise MhcLabError(f"--{name.replace('_', '-')} must be >= 1")
        if self.seq_len < 2:
            raise MhcLabError("--seq-len must be >= 2")
        if self.warmup < 0 or self.sinkhorn_iters < 0:
            raise MhcLabError("--warmup and --sinkhorn-iters must be >= 0")
        if self.device not in ("auto", "cpu", "cuda", "mps"):
            raise MhcLabError(f"--device {self.device!r}: choose auto, cpu, cuda or mps")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise MhcLabError("--device cuda: no CUDA device here (use auto or cpu)")
        if self.device == "mps" and not torch.backends.mps.is_available():
            raise MhcLabError("--device mps: no MPS device here (use auto or cpu)")
        if self.threads is not None and self.threads < 1:
            raise MhcLabError("--threads must be >= 1")


@dataclass
class BenchRow:
    """One variant at one width."""

    variant: str  # residual | hc | mhc | mhc_lite | kromhc | ortho | peer-hc | peer-mhc
    d_model: int
    median_ms: float  # median step time (forward + backward + gradient norm + AdamW step)
    min_ms: float
    ratio: float  # median over repetitions of (this step / residual's step)
    vs_mhc: float  # median over repetitions of (this step / mHC's step)
    peak_mb: Optional[float]  # see module docstring
    saved_mb: float  # tensors saved for backward, MiB
    params: int
    compile_s: Optional[float] = None  # first (compiling) step in seconds; None when eager


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def peer_available() -> bool:
    """Whether the `hyper-connections` package can be imported."""
    try:
        import hyper_connections  # noqa: F401
    except ImportError:
        return False
    return True


class PeerLanguageModel(nn.Module):
    """Our embeddings, sublayers and head around the peer package's connections.

    The peer folds the n streams into the batch: its state is (B*n, T, C).
    """

    def __init__(self, base: LanguageModel, kind: str, n_streams: int, sinkhorn_iters: int) -> None:
        super().__init__()
        if kind == "peer-hc":
            from hyper_connections import get_init_and_expand_reduce_stream_functions as init_fns

            init, expand, reduce = init_fns(n_streams, dim=base.cfg.d_model)
        else:
            from hyper_connections import mc_get_init_and_expand_reduce_stream_functions as init_fns

            init, expand, reduce = init_fns(
                n_streams, dim=base.cfg.d_model, sinkhorn_iters=sinkhorn_iters
            )
        self.base = base
        self.expand, self.reduce = expand, reduce
        self.connections = nn.ModuleList(
            init(branch=sub, layer_index=k) for k, sub in enumerate(base.sublayers)
        )

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        b, t = idx.shape
        base = self.base
        pos = torch.arange(t, device=idx.device)
        h = base.token_embedding(idx) + base.position_embedding(pos)  # (B, T, C)
        x = self.expand(h)  # (B*n, T, C)
        for connection in self.connections:
            x = connection(x)  # (B*n, T, C)
        logits = base._unembed(base.final_norm(self.reduce(x)))  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss, None


def build_variant(variant: str, d_model: int, s: BenchSettings, device: torch.device) -> nn.Module:
    """The full model for one variant, on `device`."""
    own = variant if variant in (*OWN_VARIANTS, *EXACT_VARIANTS) else "residual"
    cfg = ModelConfig(
        d_model=d_model,
        depth=s.depth,
        connection=own,
        n_streams=s.n_streams,
        sinkhorn_iters=s.sinkhorn_iters,
    )
    model: nn.Module = build_model(cfg, s.seq_len, seed=s.seed)
    if variant in PEER_VARIANTS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s.seed)
            model = PeerLanguageModel(model, variant, s.n_streams, s.sinkhorn_iters)
    return model.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def make_step(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], compile: bool = False
) -> Callable[[], None]:
    """One training step of `model` on a fixed batch: zero_grad, forward, backward, the
    trainer's gradient norm, AdamW.

    With `compile`, the forward (and through it the backward) runs through torch.compile; the
    optimiser step stays eager, as in the training loop.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device.type
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=device in ("cpu", "cuda"))  # as the trainer
    forward = torch.compile(model) if compile else model
    idx, targets = batch

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        _, loss, _ = forward(idx, targets)
        loss.backward()
        gradient_norm(params, None)  # logged by the trainer every step (a pass over every gradient)
        opt.step()

    return step


class _LinuxRss:
    """Peak resident set size of this process over a window (Linux only)."""

    def __init__(self) -> None:
        self.ok = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current VmRSS
            self._status("VmHWM")
            self.ok = True
        except (OSError, ValueError):
            return
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            self._trim = None

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # kB
        raise ValueError(key)

    def start(self) -> int:
        gc.collect()
        if self._trim is not None:
            self._trim(0)  # give freed heap pages back, so the step's allocations show in RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return self._status("VmRSS")

    def peak(self) -> int:
        return self._status("VmHWM")


def measure_memory(step: Callable[[], None], device: torch.device) -> tuple[Optional[float], float]:
    """(peak_mb, saved_mb) of one step; see the module docstring for what each measures."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    mib = 1024.0 * 1024.0
    peak: Optional[float] = None
    rss = _LinuxRss() if device.type == "cpu" else None
    _sync(device)
    if device.type == "cuda":
        gc.collect()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    elif rss is not None and rss.ok:
        before = rss.start()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    _sync(device)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - before) / mib
    elif rss is not None and rss.ok:
        peak = (rss.peak() - before) / mib
    return peak, sum(storages.values()) / mib


def _compile(
    step: Callable[[], None], device: torch.device, variant: str, progress: Optional[Callable[[str], None]]
) -> float:
    """Run the first step of a compiled model, which compiles it; its wall time in seconds."""
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    seconds = time.perf_counter() - start
    if progress:
        progress(f"{variant}: compiled in {seconds:.1f} s")
    return seconds


def run_bench(settings: BenchSettings, progress: Optional[Callable[[str], None]] = None) -> list[BenchRow]:
    """Measure every variant at every width; rows in (d_model, variant) order."""
    settings.check()
    threads = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        return _run_bench(settings, progress)
    finally:
        torch.set_num_threads(threads)


def _run_bench(settings: BenchSettings, progress: Optional[Callable[[str], None]]) -> list[BenchRow]:
    device = resolve_device(settings.device)
    variants = list(OWN_VARIANTS) + (list(EXACT_VARIANTS) if settings.exact else [])
    if settings.peer and peer_available():
        variants += list(PEER_VARIANTS)
    rows: list[BenchRow] = []
    gen = torch.Generator().manual_seed(settings.seed)
    for d_model in settings.d_models:
        if progress:
            progress(f"d_model {d_model}: building {', '.join(variants)}")
        tokens = torch.randint(0, 256, (settings.batch, settings.seq_len + 1), generator=gen)
        batch = (tokens[:, :-1].to(device), tokens[:, 1:].to(device))  # (B, T) inputs, targets
        if settings.compile:
            torch.compiler.reset()  # fresh caches: static shapes for this width, no cache limit
        models = {v: build_variant(v, d_model, settings, device) for v in variants}
        steps = {v: make_step(m, batch, settings.compile) for v, m in models.items()}
        compile_s = {v: _compile(steps[v], device, v, progress) for v in variants} if settings.compile else {}
        for _ in range(settings.warmup):
            for v in variants:
                steps[v]()
        times: dict[str, list[float]] = {v: [] for v in variants}
        for rep in range(settings.steps):
            order = variants[rep % len(variants):] + variants[: rep % len(variants)]
            for v in order:
                _sync(device)
                start = time.perf_counter()
                steps[v]()
                _sync(device)
                times[v].append(time.perf_counter() - start)
            if progress:
                progress(f"d_model {d_model}: repetition {rep + 1}/{settings.steps}")
        ref = times["residual"]
        for v in variants:
            peak, saved = measure_memory(steps[v], device)
            rows.append(
                BenchRow(
                    variant=v,
                    d_model=d_model,
                    median_ms=1000.0 * statistics.median(times[v]),
                    min_ms=1000.0 * min(times[v]),
                    ratio=statistics.median(t / r for t, r in zip(times[v], ref)),
                    vs_mhc=statistics.median(t / m for t, m in zip(times[v], times["mhc"])),
                    peak_mb=peak,
                    saved_mb=saved,
                    params=sum(p.numel() for p in models[v].parameters()),
                    compile_s=compile_s.get(v),
                )
            )
        del models, steps
        gc.collect()
    return rows


def environment(settings: BenchSettings) -> dict[str, Any]:
    """Where and how the rows were measured."""
    import platform

    device = resolve_device(settings.device)
    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": settings.threads or torch.get_num_threads(),
        "time": "median step (zero_grad, forward with loss, backward, gradient norm, AdamW step) over interleaved "
        "repetitions; ratio = median of per-repetition ratios to residual",
        "peak_mb": PEAK_MEANING.get(device.type, "not measured on this device"),
        "saved_mb": "tensors saved by autograd for backward during the forward (distinct storages)",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "settings": asdict(settings),
        "peer": peer_available() and settings.peer,
        # the fused CPU kernels (mhc_lab/nn/native): used on CPU when they built, in eager runs
        # through fused.py and in compiled ones as the custom ops of nn/ops.py
        "native_kernels": device.type == "cpu" and native.library() is not None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if info["peer"]:
        from importlib.metadata import version

        info["peer_version"] = version("hyper-connections")
    return info


def to_json(rows: list[BenchRow], settings: BenchSettings) -> str:
    """Rows plus the environment, as one JSON document."""
    return json.dumps(
        {"environment": environment(settings), "rows": [asdict(r) for r in rows]}, indent=2
    )


def render_table(rows: list[BenchRow], settings: BenchSettings) -> Table:
    """A rich table of the rows, one line per (d_model, variant)."""
    from rich.table import Table

    env = environment(settings)
    mode = "torch.compile, " if settings.compile else ""
    if env["device"] == "cpu":
        mode += "native kernels, " if env["native_kernels"] else "torch ops only, "
    preset = f"preset {settings.preset}: " if settings.preset else ""
    table = Table(
        title=f"Step time (fwd + bwd + grad norm + AdamW), {preset}{mode}depth {settings.depth}, n {settings.n_streams}, "
        f"batch {settings.batch} x {settings.seq_len}, {env['device']}, "
        f"{env['threads']} threads, torch {env['torch']}",
        caption=f"median of {settings.steps} interleaved repetitions after {settings.warmup} "
        "warm-up steps; ratios = median per-repetition ratio to residual's (mHC's) step; peak = step peak "
        "above resident memory; saved = tensors saved for backward"
        + ("; compile s = the first, compiling step (not in the times)" if settings.compile else ""),
    )
    columns = ["d_model", "variant", "median ms", "min ms", "x residual", "x mHC", "peak MiB", "saved MiB", "params"]
    if settings.compile:
        columns.append("compile s")
    for name in columns:
        table.add_column(name, justify="left" if name == "variant" else "right")
    for r in rows:
        cells = [
            str(r.d_model),
            r.variant,
            f"{r.median_ms:.1f}",
            f"{r.min_ms:.1f}",
            f"{r.ratio:.3f}",
            f"{r.vs_mhc:.3f}",
            "n/a" if r.peak_mb is None else f"{r.peak_mb:.1f}",
            f"{r.saved_mb:.1f}",
            f"{r.params:,}",
        ]
        if settings.compile:
            cells.append("n/a" if r.compile_s is None else f"{r.compile_s:.1f}")
        table.add_row(*cells)
    return table
