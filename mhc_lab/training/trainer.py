"""One training run: data, model, AdamW loop, gain probes, checkpoints, divergence.

Step convention: `step` s counts optimiser updates already applied. The metrics line of step
s holds the loss of the model after s updates on batch s (then update s+1 is applied); the
probe of step s measures that same model, so probes run at s = 0, every, 2*every, ... and at
s = steps (after the last update). Batches depend only on (seed, step), and a checkpoint is
saved at every probe, so an interrupted run resumes to the same numbers.

Checkpoints hold tensors and plain numbers only and are read with `torch.load(...,
weights_only=True)`, so one from someone else's results folder cannot run code. The previous
checkpoint is kept beside the newest: an unreadable checkpoint (damaged, or refused) falls
back to it, else to a fresh start of the run, each with one line (a `note` progress event).
"""

from __future__ import annotations

import io
import math
import os
import pickle
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import __version__
from ..experiment.config import RunConfig
from .data import Corpus, load_corpus, probe_sequence, training_batch, validation_batches
from ..probe.constraint import constraint_statistics, hres_statistics
from ..probe.gain import gain_metrics
from ..nn.model import LanguageModel, build_model, gradient_norm
from .loggers import MetricLogger
from .schedule import learning_rate
from ..store import JsonlWriter, RunFiles, atomic_write_bytes, truncate_jsonl

ProgressCallback = Callable[[dict], None]


class CheckpointError(Exception):
    """A checkpoint that cannot be resumed from; the message is one line naming the file."""


def read_checkpoint(data: bytes, device: torch.device, name: str = "checkpoint") -> dict:
    """A checkpoint's contents, from its bytes, or CheckpointError.

    `weights_only=True`: torch unpickles only tensors, containers and plain numbers and
    strings (all a checkpoint holds: model and AdamW state dicts, run state; no allow-list is
    needed), and refuses anything else, such as a pickled callable, without running it."""
    try:
        payload = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:  # the weights-only unpickler's refusals
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:
            raise CheckpointError(
                f"{name}: refused, it holds a pickled Python object ({found.group(1)}), not only "
                "tensors and numbers; a checkpoint from elsewhere could run code this way") from None
        raise CheckpointError(f"{name}: unreadable (not a torch checkpoint)") from None
    except Exception as exc:  # noqa: BLE001 - torn zips, wrong formats
        text = str(exc).strip()
        reason = text.splitlines()[0].split(". ")[0][:160] if text else type(exc).__name__
        raise CheckpointError(f"{name}: unreadable ({reason})") from None
    if not isinstance(payload, dict) or not {"model", "optimizer", "state"} <= set(payload):
        raise CheckpointError(f"{name}: unreadable (not an mhc-lab checkpoint: no model, optimizer and state)")
    return payload


def _print_note(event: dict) -> None:
    """The default progress callback: only notes matter without a display (job logs)."""
    if event.get("event") == "note":
        print(event["line"], file=sys.stderr, flush=True)


def pick_device(name: str) -> torch.device:
    """`auto`: CUDA, then MPS, then CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def environment(device: torch.device, corpus: Corpus) -> dict:
    """What produced a result: versions, device, threads, and the exact data."""
    return {
        "mhc_lab": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "corpus": corpus.description,
        "corpus_sha256": corpus.fingerprint,
        "corpus_bytes": corpus.n_bytes,
        "corpus_files": corpus.n_files,
    }


@dataclass
class PeakTracker:
    """The probe with the largest composite gain so far and its H_res, the largest composite
    gains per direction, and the largest signal growth. A checkpoint written before the signal
    growth was measured restores `signal` as -inf: the peak then covers the later probes."""

    gain: float = -1.0
    step: int = 0
    layer: int = 0
    hres: Optional[torch.Tensor] = None
    # largest composite gains over all probes; every run probes at step 0, so they get set
    fwd: float = float("-inf")
    bwd: float = float("-inf")
    fwd_inf: float = float("-inf")
    bwd_inf: float = float("-inf")
    signal: float = float("-inf")  # largest stream RMS over the embedding's (signal_growth)

    def update(self, step: int, headline: dict, hres: torch.Tensor, signal: float) -> None:
        if not math.isnan(signal):
            self.signal = max(signal, self.signal)
        self.fwd_inf = max(headline["max_gain_fwd_inf"], self.fwd_inf)
        self.bwd_inf = max(headline["max_gain_bwd_inf"], self.bwd_inf)
        self.fwd = max(headline["max_gain_fwd"], self.fwd)
        self.bwd = max(headline["max_gain_bwd"], self.bwd)
        if headline["max_gain"] > self.gain:
            self.gain, self.step, self.layer = headline["max_gain"], step, headline["max_gain_layer"]
            self.hres = hres

    def state(self) -> dict:
        return dict(self.__dict__)


@dataclass
class RunState:
    """Everything a checkpoint must restore beyond model and optimiser."""

    step: int = 0
    first_loss: Optional[float] = None
    wall_s: float = 0.0
    tokens: int = 0
    train_s: float = 0.0
    peak: PeakTracker = field(default_factory=PeakTracker)
    last_loss: float = float("nan")
    last_val_loss: float = float("nan")


def signal_growth(stream_rms: torch.Tensor) -> float:
    """Largest RMS of the hidden state over the layers, relative to the embedding's (layer 0's
    input): how far the residual signal itself grew. Residual: the sum of L sublayer outputs;
    HC: also multiplied by the composite H_res; mHC: mixed by doubly stochastic matrices."""
    return float(stream_rms.max() / stream_rms[0])


class Trainer:
    """Trains one run and writes its files; `run()` returns the summary dict."""

    def __init__(
        self,
        cfg: RunConfig,
        files: RunFiles,
        base_dir: Optional[Path] = None,
        progress: Optional[ProgressCallback] = None,
        logger: Optional[MetricLogger] = None,
    ) -> None:
        self.cfg = cfg
        self.files = files
        self.progress = progress or _print_note
        self.logger = logger or MetricLogger()  # live logging (W&B, TensorBoard): loggers/
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device = pick_device(cfg.train.device)
        self.corpus = load_corpus(cfg.data, base_dir)
        self.model: LanguageModel = build_model(cfg.model, cfg.train.seq_len, cfg.seed).to(self.device)
        self.forward = torch.compile(self.model) if cfg.train.compile else self.model
        t = cfg.train
        # fused: one kernel over all parameters instead of about ten ops per tensor (HC and mHC
        # add 7-8 small tensors per layer); the same update (BENCHMARKS.md, round 5)
        self.optimizer = torch.optim.AdamW(
            self.model.parameter_groups(t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
            fused=self.device.type in ("cpu", "cuda"),
        )
        self.probe_x, self.probe_y = (z.to(self.device) for z in probe_sequence(self.corpus.val, t.seq_len))
        self.val = [
            (x.to(self.device), y.to(self.device))
            for x, y in validation_batches(self.corpus.val, t.batch_size, t.seq_len, cfg.probe.val_batches)
        ]
        self.state = RunState()
        self.last_probe: tuple[int, torch.Tensor] = (0, torch.empty(0))
        self.last_headline: dict = {}  # the last probe's headline: the run's final gains
        self.resumed_from: Optional[bytes] = None  # the checkpoint this run resumed from

    def note(self, line: str) -> None:
        """One line for the user (the reporter prints it; a job writes it to its log)."""
        self.progress({"event": "note", "line": line})

    # -- checkpoints -------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """checkpoint.pt, atomically; the one it replaces becomes checkpoint.previous.pt."""
        payload = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "state": {**self.state.__dict__, "peak": self.state.peak.state()},
        }
        buf = io.BytesIO()
        torch.save(payload, buf)
        if self.files.checkpoint.exists():
            os.replace(self.files.checkpoint, self.files.previous_checkpoint)
        atomic_write_bytes(self.files.checkpoint, buf.getvalue())

    def load_checkpoint(self) -> bool:
        """Restore from checkpoint.pt, else from checkpoint.previous.pt, and drop the log lines
        written after it; with neither readable, start the run afresh. Says which in one line.
        An unreadable checkpoint is kept as checkpoint.unreadable.pt until the run ends."""
        files = self.files
        candidates = [p for p in (files.checkpoint, files.previous_checkpoint) if p.exists()]
        if not candidates:
            return False
        initial = ({k: v.detach().clone() for k, v in self.model.state_dict().items()},
                   self.optimizer.state_dict())
        for i, path in enumerate(candidates):
            try:
                data = path.read_bytes()
                self.restore(read_checkpoint(data, self.device, str(path)))
            except (CheckpointError, OSError, KeyError, TypeError, ValueError, RuntimeError) as exc:
                self.model.load_state_dict(initial[0])
                self.optimizer.load_state_dict(initial[1])
                self.state = RunState()
                os.replace(path, files.unreadable_checkpoint)
                reason = str(exc) if str(exc).startswith(str(path)) else f"{path}: unreadable ({exc})"
                then = (f"resuming from {candidates[i + 1].name}" if i + 1 < len(candidates)
                        else f"starting {files.run_id} afresh")
                self.note(f"{reason.splitlines()[0]}; {then}")
                continue
            self.resumed_from = data
            truncate_jsonl(files.metrics, self.state.step)
            truncate_jsonl(files.probes, self.state.step)
            self.note(f"resuming {files.run_id} from step {self.state.step}"
                      + (f" ({path.name})" if path != files.checkpoint else ""))
            return True
        for log in (files.metrics, files.probes, files.hres):  # they belonged to the lost checkpoint
            log.unlink(missing_ok=True)
        return False

    def restore(self, payload: dict) -> None:
        """Model, optimiser and run state from a checkpoint's contents (checked first, so a
        malformed one raises before anything is changed)."""
        state = dict(payload["state"])
        peak = PeakTracker(**state.pop("peak"))
        run_state = RunState(**state, peak=peak)
        expected = self.model.state_dict()
        weights = payload["model"]
        if set(weights) != set(expected) or any(
                not isinstance(weights[k], torch.Tensor) or weights[k].shape != v.shape for k, v in expected.items()):
            raise CheckpointError("model weights do not match this run's model")
        self.model.load_state_dict(weights)
        self.optimizer.load_state_dict(payload["optimizer"])
        self.state = run_state

    # -- measurements ------------------------------------------------------------------

    def _autocast(self):
        enabled = self.cfg.train.autocast_bf16 and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    @torch.no_grad()
    def probe(self, step: int, writer: JsonlWriter) -> dict:
        """Validation loss and the gain metric on the fixed probe sequence (eval mode)."""
        self.model.eval()
        with self._autocast():
            val_loss = sum(self.model(x, y)[1].item() for x, y in self.val) / len(self.val)
            capture = self.model.probe(self.probe_x)
        hres, streams = capture.hres, capture.stream_rms  # (L, T, n, n), (L + 1,)
        self.model.train()
        signal = signal_growth(streams)
        hres = hres.float().cpu()
        metrics = gain_metrics(hres)
        self.state.peak.update(step, metrics["headline"], hres, signal)
        self.last_probe = (step, hres)
        self.last_headline = metrics["headline"]
        self.state.last_val_loss = val_loss
        constraint = {**hres_statistics(hres), **constraint_statistics(capture.diagnostics)}
        record = {"step": step, "val_loss": val_loss, **metrics, "hres": constraint,
                  "stream_rms": streams.tolist(), "signal_growth": signal}
        writer.write(record)
        self.logger.log_probe(record)
        return record

    def train_step(self, step: int) -> tuple[float, float, float]:
        """One update on batch `step`: returns (loss, pre-clip gradient norm, seconds)."""
        t = self.cfg.train
        lr = learning_rate(t, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = self.batch(step)
        start = time.perf_counter()
        with self._autocast():
            _, loss, _ = self.forward(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = self.gradient_norm(t.grad_clip)
        loss_value = self.loss_value(loss)
        if math.isfinite(loss_value) and math.isfinite(grad_norm):
            self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return loss_value, grad_norm, time.perf_counter() - start

    def gradient_norm(self, max_norm: Optional[float]) -> float:
        """`nn.model.gradient_norm` of the model: the logged norm, and the clip if set."""
        return gradient_norm(self.model.parameters(), max_norm)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Training batch `step` on this process's device (data-parallel ranks take a slice)."""
        t = self.cfg.train
        x, y = training_batch(self.corpus.train, t.batch_size, t.seq_len, self.cfg.seed, step)
        return x.to(self.device), y.to(self.device)

    def loss_value(self, loss: torch.Tensor) -> float:
        """The step's loss as a number (data-parallel ranks average it over ranks)."""
        return loss.item()

    def open_log(self, path: Path) -> JsonlWriter:
        """A writer for metrics.jsonl / probes.jsonl (data-parallel ranks other than 0 write none)."""
        return JsonlWriter(path)

    def divergence(self, loss: float, grad_norm: float) -> Optional[str]:
        """Why the run has diverged at this step, or None."""
        if not math.isfinite(loss):
            return f"non-finite loss ({loss})"
        if not math.isfinite(grad_norm):
            return f"non-finite gradient norm ({grad_norm})"
        factor = self.cfg.train.diverge_factor
        if factor is not None and self.state.first_loss is not None and loss > factor * self.state.first_loss:
            return f"loss {loss:.3f} exceeds {factor} x its first value {self.state.first_loss:.3f}"
        return None

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        self.load_checkpoint()
        self.logger.start(self.state.step)
        metrics = self.open_log(self.files.metrics)
        probes = self.open_log(self.files.probes)
        status, reason, diverged_step = "completed", None, None
        session_start = time.perf_counter()
        wall_before = self.state.wall_s
        try:
            step = self.state.step
            while True:
                if step % cfg.probe.every == 0 or step == t.steps:
                    record = self.probe(step, probes)
                    self.progress({"event": "probe", "step": step, "val_loss": record["val_loss"],
                                   "gain": record["headline"]["max_gain"], "peak": self.state.peak.gain})
                    if cfg.probe.checkpoint and step < t.steps:
                        self.state.step = step
                        self.state.wall_s = wall_before + time.perf_counter() - session_start
                        self.save_checkpoint()
                if step == t.steps:
                    break
                loss, grad_norm, seconds = self.train_step(step)
                if self.state.first_loss is None:
                    self.state.first_loss = loss
                self.state.tokens += t.batch_size * t.seq_len
                self.state.train_s += seconds
                self.state.last_loss = loss
                reason = self.divergence(loss, grad_norm)
                if step % t.log_every == 0 or step == t.steps - 1 or reason is not None:
                    line = {
                        "step": step, "loss": loss, "grad_norm": grad_norm,
                        "lr": learning_rate(t, step),
                        "tokens_per_s": t.batch_size * t.seq_len / max(seconds, 1e-9),
                    }
                    metrics.write(line)
                    self.logger.log_step(line)
                self.progress({"event": "step", "step": step, "loss": loss, "grad_norm": grad_norm})
                if reason is not None:
                    status, diverged_step = "diverged", step
                    updated = math.isfinite(loss) and math.isfinite(grad_norm)
                    if updated and all(torch.isfinite(p).all() for p in self.model.parameters()):
                        self.probe(step + 1, probes)  # the surge as measured after update step+1
                    break
                step += 1
        finally:
            metrics.close()
            probes.close()
        self.state.wall_s = wall_before + time.perf_counter() - session_start
        steps_done = diverged_step + 1 if diverged_step is not None else t.steps
        return self._finish(status, reason, diverged_step, steps_done)

    def _finish(self, status: str, reason: Optional[str], diverged_step: Optional[int], steps_done: int) -> dict:
        """Save hres.npz and return the run's summary row (plus environment and reason)."""
        peak = self.state.peak
        last_step, last_hres = self.last_probe
        # a checkpoint restored with map_location puts the peak on the device: bring it back
        self.files.save_hres(peak.hres.cpu().numpy(), peak.step, last_hres.cpu().numpy(), last_step)
        return {
            **config_columns(self.files.run_id, self.cfg),
            "n_params": self.model.n_params(),
            "status": status,
            "steps_done": steps_done,
            "final_loss": self.state.last_loss,
            "final_val_loss": self.state.last_val_loss,
            "max_gain_fwd": peak.fwd,
            "max_gain_bwd": peak.bwd,
            "max_gain_step": peak.step,
            "max_gain_layer": peak.layer,
            "max_gain_fwd_inf": peak.fwd_inf,
            "max_gain_bwd_inf": peak.bwd_inf,
            "final_gain_fwd": self.last_headline.get("max_gain_fwd", float("nan")),
            "final_gain_bwd": self.last_headline.get("max_gain_bwd", float("nan")),
            "max_signal_growth": peak.signal,
            "diverged_step": diverged_step,
            "reason": reason,
            "wall_s": round(self.state.wall_s, 3),
            "tokens_per_s": round(self.state.tokens / max(self.state.train_s, 1e-9), 1),
            "environment": environment(self.device, self.corpus),
        }


def config_columns(run_id: str, cfg: RunConfig) -> dict:
    """The summary columns that come from the config alone."""
    m = cfg.model
    return {
        "run_id": run_id,
        "connection": m.connection,
        "depth": m.depth,
        "layers": m.layers,
        "d_model": m.d_model,
        "n_streams": m.n_streams,
        "sinkhorn_iters": m.sinkhorn_iters if m.connection == "mhc" else None,
        "sinkhorn_tol": m.sinkhorn_tol if m.connection == "mhc" else None,
        "lr": cfg.train.lr,
        "seed": cfg.seed,
    }


def train_run(
    cfg: RunConfig,
    files: RunFiles,
    base_dir: Optional[Path] = None,
    progress: Optional[ProgressCallback] = None,
    logger: Optional[MetricLogger] = None,
) -> dict:
    """Train one run into `files` and return its summary (status completed or diverged);
    `logger` mirrors its metrics and probes live (W&B, TensorBoard)."""
    return Trainer(cfg, files, base_dir, progress, logger).run()
