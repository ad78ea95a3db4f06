"""Fused CPU kernels for the stream mixing, compiled from `kernels.c` at first use (with
`kernels_impl.h`, the kernels for one float type, and `vmath.h`, exp, log, tanh and sigmoid
written so that the loops calling them vectorise).

Legend: M = tokens, n = residual streams, C = d_model, P = n + 1.

The kernels do what `mixing.py`, `fused.py` and `sinkhorn.py` otherwise do with torch ops:
HC's and mHC's norm, coefficients and stream read fused (forward and backward), the read
R x and its backward, the write's backward, Sinkhorn-Knopp forward and recomputing backward;
each in one pass over its operands with one token's (or one block of tokens') data in cache
at a time. BENCHMARKS.md has the figures. They are an accelerator, never a requirement:

- built once per source, compiler and CPU with `cc -O3 -march=native -fopenmp -shared` into
  a cache folder (`$MHC_LAB_CACHE`, else `$XDG_CACHE_HOME/mhc-lab`, else `~/.cache/mhc-lab`),
  written atomically, so concurrent workers can build at once;
- loaded with ctypes (no torch headers; building takes about 5 s);
- OpenMP from torch's own libgomp when torch ships one (Linux wheels: the kernels' library
  links `libgomp.so.1`, which is then the one torch loaded); with another OpenMP runtime, a
  second thread pool may load beside torch's;
- used only for contiguous float32/float64 CPU tensors outside `torch.compile`; everything
  else (CUDA, bf16, compiled graphs) takes the torch ops;
- `MHC_LAB_NATIVE=0` turns them off; with no C compiler, or a failed build, mhc-lab says so
  once on stderr and takes the torch ops.

The results agree with the torch ops to float rounding (tests/test_native.py), not bit for
bit: a run's numbers can differ in the last bits with and without the kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

SOURCE = Path(__file__).with_name("kernels.c")
SOURCES = (SOURCE, SOURCE.with_name("kernels_impl.h"), SOURCE.with_name("vmath.h"))  # what the build hashes
MAX_STREAMS = 8  # kernels.c: MAX_N
# -ffp-contract=fast: a * b + c may become one fused multiply-add where the CPU has one (more
# accurate, not less; 5-10% faster kernels); whether it does is fixed when the library is built,
# so results still do not depend on the thread count.
FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-std=c11", "-ffp-contract=fast"]
_DTYPES = {torch.float32: "f32", torch.float64: "f64"}
_KERNELS = (
    "mhc_read_forward", "mhc_read_backward", "mhc_write_backward",
    "mhc_hc_forward", "mhc_hc_backward", "mhc_mhc_forward", "mhc_mhc_backward", "mhc_vmath",
)

_library: Optional[ctypes.CDLL] = None
_load_tried = False


def cache_dir() -> Path:
    """Where built kernels are kept."""
    if os.environ.get("MHC_LAB_CACHE"):
        return Path(os.environ["MHC_LAB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mhc-lab"


def _cpu_fingerprint() -> str:
    """What -march=native depends on: the CPU model and its feature flags (Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    keys = ("model name", "flags", "Features", "CPU implementer", "CPU part", "CPU architecture")
    lines = [ln for ln in text.splitlines() if ln.startswith(keys)]  # x86, then ARM
    return "\n".join(sorted(set(lines)))


def _compiler() -> Optional[list[str]]:
    """The C compiler command: $CC (may carry arguments, e.g. "ccache gcc"), else cc or gcc."""
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    found = shutil.which("cc") or shutil.which("gcc")
    return [found] if found else None


def _build(cc: list[str]) -> Path:
    """Compile kernels.c into the cache (once per source, compiler, flags and CPU)."""
    source = b"".join(path.read_bytes() for path in SOURCES)
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        b"\0".join(
            [source, " ".join(cc).encode(), version.encode(), " ".join(FLAGS).encode(),
             platform.machine().encode(), _cpu_fingerprint().encode()]
        )
    ).hexdigest()[:16]
    target = cache_dir() / f"kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        # OpenMP when the compiler has it (torch's libgomp, already loaded, then serves it);
        # else one thread per call, with the `omp simd` loops still vectorised.
        for extra in (["-fopenmp"], ["-fopenmp-simd"], []):
            done = subprocess.run(
                [*cc, *FLAGS, *extra, str(SOURCE), "-o", str(out), "-lm"],
                capture_output=True,
                text=True,
            )
            if done.returncode == 0:
                break
        else:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr else "cc failed")
        os.replace(out, target)  # atomic: a concurrent build of the same key writes the same file
    return target


def _declare(lib: ctypes.CDLL) -> None:
    """Argument types: pointers as void*, sizes int64, the thread count int."""
    p, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    for suffix in _DTYPES.values():
        getattr(lib, f"mhc_hc_forward_{suffix}").argtypes = [
            p, p, p, p, f64, f64, i32, f64, p, p, p, p, p, p, i64, i64, i64, i32]
        getattr(lib, f"mhc_hc_backward_{suffix}").argtypes = [
            p, p, p, f64, f64, i32, p, p, p, p, p, p, p, p, p, p, i64, i64, i64, i32]
        getattr(lib, f"mhc_mhc_forward_{suffix}").argtypes = [
            p, p, p, f64, i64, p, p, p, p, p, p, i64, i64, i64, i32]
        getattr(lib, f"mhc_mhc_backward_{suffix}").argtypes = [
            p, p, p, p, i64, p, p, p, p, p, p, i64, i64, i64, i32]
        getattr(lib, f"mhc_read_forward_{suffix}").argtypes = [p, p, p, p, i64, i64, i64, i32]
        getattr(lib, f"mhc_read_backward_{suffix}").argtypes = [p, p, p, p, p, p, i64, i64, i64, i32]
        getattr(lib, f"mhc_write_backward_{suffix}").argtypes = [p, p, p, p, p, i64, i64, i64, i32]
        getattr(lib, f"mhc_sinkhorn_forward_{suffix}").argtypes = [p, p, i64, i64, i64, i32]
        getattr(lib, f"mhc_sinkhorn_backward_{suffix}").argtypes = [p, p, p, i64, i64, i64, i32]
        getattr(lib, f"mhc_vmath_{suffix}").argtypes = [i32, p, p, i64]
        for name in _KERNELS:
            getattr(lib, f"{name}_{suffix}").restype = None
        getattr(lib, f"mhc_sinkhorn_forward_{suffix}").restype = i32
        getattr(lib, f"mhc_mhc_forward_{suffix}").restype = i32
        getattr(lib, f"mhc_mhc_backward_{suffix}").restype = i32
        getattr(lib, f"mhc_sinkhorn_backward_{suffix}").restype = i32


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernels, building them on first call; None when off or unavailable."""
    global _library, _load_tried
    if _load_tried:
        return _library
    _load_tried = True
    if os.environ.get("MHC_LAB_NATIVE", "1") == "0":
        return None
    cc = _compiler()
    if cc is None:
        print("mhc-lab: no C compiler found; using torch ops for the stream mixing", file=sys.stderr)
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
        _declare(lib)
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        print(f"mhc-lab: fused CPU kernels unavailable ({err}); using torch ops", file=sys.stderr)
        return None
    _library = lib
    return lib


def reset() -> None:
    """Forget the loaded library, so the next `library()` call looks again (tests)."""
    global _library, _load_tried
    _library, _load_tried = None, False


def usable(*tensors: torch.Tensor, streams: int = 1) -> bool:
    """True if the kernels can take these tensors: CPU, one float32/float64 dtype, contiguous,
    and for the stream mixing at most MAX_STREAMS streams."""
    first = tensors[0]
    if streams > MAX_STREAMS:
        return False
    if first.device.type != "cpu" or first.dtype not in _DTYPES:
        return False
    if any(t.dtype != first.dtype or t.device != first.device or not t.is_contiguous() for t in tensors):
        return False
    return library() is not None


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _kernel(name: str, shapes: dict[str, tuple[Optional[torch.Tensor], tuple[int, ...]]], streams: Optional[int] = None):
    """The kernel `name` for the tensors' dtype, after checking that they are exactly what
    the C code reads (anything else would read or write out of bounds): `shapes` maps each
    operand's name to (tensor or None, expected shape); all contiguous, on the CPU, of one
    float dtype; `streams`, where given, within 1..MAX_STREAMS."""
    if streams is not None and not 1 <= streams <= MAX_STREAMS:
        raise ValueError(f"mhc-lab native {name}: n = {streams} streams, the kernels take 1..{MAX_STREAMS}")
    given = {key: t for key, (t, _) in shapes.items() if t is not None}
    dtype = next(iter(given.values())).dtype
    for key, (t, shape) in shapes.items():
        if t is None:
            continue
        if t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"mhc-lab native {name}: needs contiguous CPU tensors of one dtype ({key})")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"mhc-lab native {name}: {key} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if dtype not in _DTYPES:
        raise ValueError(f"mhc-lab native {name}: float32 or float64 only, got {dtype}")
    return getattr(library(), f"{name}_{_DTYPES[dtype]}")


def _streams(x: torch.Tensor) -> tuple[tuple[int, ...], int, int, int]:
    """(lead, M, n, C) for streams x (*lead, n, C): the kernels see M = prod(lead) tokens."""
    *lead, n, c = x.shape
    return tuple(lead), math.prod(lead), n, c


def read_forward(x: torch.Tensor, read: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R[..., 0, :] x, R[..., 1:, :] x) per token: x (*lead, n, C), read (*lead, n + 1, n)
    -> (*lead, C), (*lead, n, C)."""
    lead, m, n, c = _streams(x)
    y_in, y_mix = x.new_empty(*lead, c), x.new_empty(*lead, n, c)
    fn = _kernel("mhc_read_forward", {"x": (x, (*lead, n, c)), "read": (read, (*lead, n + 1, n))}, streams=n)
    fn(x.data_ptr(), read.data_ptr(), y_in.data_ptr(), y_mix.data_ptr(), m, n, c, torch.get_num_threads())
    return y_in, y_mix


def read_backward(
    x: torch.Tensor,
    read: torch.Tensor,
    grad_in: torch.Tensor,
    grad_mixed: torch.Tensor,
    need_x: bool,
    need_read: bool,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of x (*lead, n, C) and read (*lead, n + 1, n) from those of the two read
    outputs."""
    lead, m, n, c = _streams(x)
    grad_x = x.new_empty(*lead, n, c) if need_x else None
    grad_read = x.new_empty(*lead, n + 1, n) if need_read else None
    fn = _kernel("mhc_read_backward", {"x": (x, (*lead, n, c)), "read": (read, (*lead, n + 1, n)), "grad_in": (grad_in, (*lead, c)), "grad_mixed": (grad_mixed, (*lead, n, c))}, streams=n)
    fn(x.data_ptr(), read.data_ptr(), grad_in.data_ptr(), grad_mixed.data_ptr(),
       _ptr(grad_x), _ptr(grad_read), m, n, c, torch.get_num_threads())
    return grad_x, grad_read


def write_backward(
    grad: torch.Tensor, layer_out: torch.Tensor, h_post: torch.Tensor, need_post: bool, need_out: bool
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """For out = mixed + H_post^T F: (dL/dH_post (*lead, n), dL/dF (*lead, C)) from dL/dout
    (*lead, n, C)."""
    lead, m, n, c = _streams(grad)
    grad_post = grad.new_empty(*lead, n) if need_post else None
    grad_out = grad.new_empty(*lead, c) if need_out else None
    fn = _kernel("mhc_write_backward", {"grad": (grad, (*lead, n, c)), "layer_out": (layer_out, (*lead, c)), "h_post": (h_post, (*lead, n))}, streams=n)
    fn(grad.data_ptr(), layer_out.data_ptr(), h_post.data_ptr(), _ptr(grad_out), _ptr(grad_post),
       m, n, c, torch.get_num_threads())
    return grad_post, grad_out


VMATH = ("exp", "log", "tanh", "sigmoid")  # vmath.h, in the order of its `which`


def vmath(name: str, x: torch.Tensor) -> torch.Tensor:
    """vmath.h's elementwise `name` (exp, log, tanh or sigmoid), as the kernels compute it, of
    a contiguous float32/float64 CPU tensor (for the tests)."""
    out = torch.empty_like(x)
    fn = _kernel("mhc_vmath", {"x": (x, tuple(x.shape))})
    fn(VMATH.index(name), x.data_ptr(), out.data_ptr(), x.numel())
    return out


def sinkhorn_forward(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Sinkhorn-Knopp of logits (M, n, n), iters >= 1 (the steps of sinkhorn._iterate)."""
    m, n = logits.shape[:2]
    if iters < 1:
        raise ValueError(f"mhc-lab native sinkhorn: iters must be >= 1, got {iters}")
    out = torch.empty_like(logits)
    fn = _kernel("mhc_sinkhorn_forward", {"logits": (logits, (m, n, n))})
    if fn(logits.data_ptr(), out.data_ptr(), m, n, iters, torch.get_num_threads()):
        raise MemoryError("mhc-lab: no memory for the Sinkhorn scratch")
    return out


def sinkhorn_backward(logits: torch.Tensor, grad_h: torch.Tensor, iters: int) -> torch.Tensor:
    """d loss / d logits (M, n, n) from d loss / d H, recomputing the iterations."""
    m, n = logits.shape[:2]
    if iters < 1:
        raise ValueError(f"mhc-lab native sinkhorn: iters must be >= 1, got {iters}")
    grad = torch.empty_like(logits)
    fn = _kernel("mhc_sinkhorn_backward", {"logits": (logits, (m, n, n)), "grad_h": (grad_h, (m, n, n))})
    if fn(logits.data_ptr(), grad_h.data_ptr(), grad.data_ptr(), m, n, iters, torch.get_num_threads()):
        raise MemoryError("mhc-lab: no memory for the Sinkhorn trace")
    return grad


def hc_forward(
    x: torch.Tensor, weight_t: torch.Tensor, static_alpha: torch.Tensor, static_beta: torch.Tensor,
    gate_alpha: float, gate_beta: float, use_tanh: bool, eps: float,
) -> tuple[torch.Tensor, ...]:
    """HC's coefficients and read in one pass (kernels_impl.h, "HC"): x (*lead, n, C), weight_t
    (n + 2, C) = (w * [W_m | W_r | W_beta])^T, static_alpha (n, n + 1), static_beta (n,).
    Returns y_in (*lead, C), y_mix (*lead, n, C), h_post (*lead, n), h_res (*lead, n, n) and,
    for the backward, p (*lead, n, n + 2) (the normalised projections) and inv (*lead, n)
    (1 / rms)."""
    lead, m, n, c = _streams(x)
    y_in, y_mix = x.new_empty(*lead, c), x.new_empty(*lead, n, c)
    h_post, h_res = x.new_empty(*lead, n), x.new_empty(*lead, n, n)
    p, inv = x.new_empty(*lead, n, n + 2), x.new_empty(*lead, n)
    fn = _kernel("mhc_hc_forward", {"x": (x, (*lead, n, c)), "weight_t": (weight_t, (n + 2, c)), "static_alpha": (static_alpha, (n, n + 1)), "static_beta": (static_beta, (n,))}, streams=n)
    fn(x.data_ptr(), weight_t.data_ptr(), static_alpha.data_ptr(), static_beta.data_ptr(), gate_alpha,
       gate_beta, int(use_tanh), eps, y_in.data_ptr(), y_mix.data_ptr(), h_post.data_ptr(),
       h_res.data_ptr(), p.data_ptr(), inv.data_ptr(), m, n, c, torch.get_num_threads())
    return y_in, y_mix, h_post, h_res, p, inv


def hc_backward(
    x: torch.Tensor, weight_t: torch.Tensor, static_alpha: torch.Tensor, gate_alpha: float,
    gate_beta: float, use_tanh: bool, p: torch.Tensor, inv: torch.Tensor, grad_in: torch.Tensor,
    grad_mixed: torch.Tensor, grad_post: Optional[torch.Tensor], grad_hres: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of `hc_forward` in one pass: grad_x (*lead, n, C), the per-token gradient of
    alpha (*lead, n, n + 1), inv * dL/dp (*lead, n, n + 2) and each token's parts of
    dL/ds_alpha and dL/ds_beta (*lead, 2), from which the caller sums the parameter
    gradients."""
    lead, m, n, c = _streams(x)
    grad_x, grad_alpha, dp_scaled = torch.empty_like(x), x.new_empty(*lead, n, n + 1), x.new_empty(*lead, n, n + 2)
    gate_parts = x.new_empty(*lead, 2)
    fn = _kernel("mhc_hc_backward", {"x": (x, (*lead, n, c)), "weight_t": (weight_t, (n + 2, c)), "static_alpha": (static_alpha, (n, n + 1)), "p": (p, (*lead, n, n + 2)), "inv": (inv, (*lead, n)), "grad_in": (grad_in, (*lead, c)), "grad_mixed": (grad_mixed, (*lead, n, c)), "grad_post": (grad_post, (*lead, n)), "grad_hres": (grad_hres, (*lead, n, n))}, streams=n)
    fn(x.data_ptr(), weight_t.data_ptr(), static_alpha.data_ptr(), gate_alpha, gate_beta, int(use_tanh),
       p.data_ptr(), inv.data_ptr(), grad_in.data_ptr(), grad_mixed.data_ptr(), _ptr(grad_post),
       _ptr(grad_hres), grad_x.data_ptr(), grad_alpha.data_ptr(), dp_scaled.data_ptr(),
       gate_parts.data_ptr(), m, n, c, torch.get_num_threads())
    return grad_x, grad_alpha, dp_scaled, gate_parts


def mhc_forward(
    x: torch.Tensor, raw: torch.Tensor, bias: torch.Tensor, eps: float, iters: int
) -> tuple[torch.Tensor, ...]:
    """mHC's coefficients and read in one pass (kernels_impl.h, "mHC"): x (*lead, n, C), raw =
    vec(x) @ phi (*lead, 2n + n^2), bias (2n + n^2,). Returns y_in (*lead, C), y_mix
    (*lead, n, C), h_post (*lead, n), h_res (*lead, n, n) and, for the backward, the logits
    (*lead, 2n + n^2) and inv = 1 / rms(vec(x)) (*lead,)."""
    lead, m, n, c = _streams(x)
    k = 2 * n + n * n
    if iters < 0:
        raise ValueError(f"mhc-lab native mhc: iters must be >= 0, got {iters}")
    y_in, y_mix = x.new_empty(*lead, c), x.new_empty(*lead, n, c)
    h_post, h_res, logits, inv = x.new_empty(*lead, n), x.new_empty(*lead, n, n), torch.empty_like(raw), x.new_empty(lead)
    fn = _kernel("mhc_mhc_forward", {"x": (x, (*lead, n, c)), "raw": (raw, (*lead, k)), "bias": (bias, (k,))}, streams=n)
    if fn(x.data_ptr(), raw.data_ptr(), bias.data_ptr(), eps, iters, y_in.data_ptr(), y_mix.data_ptr(),
          h_post.data_ptr(), h_res.data_ptr(), logits.data_ptr(), inv.data_ptr(), m, n, c,
          torch.get_num_threads()):
        raise MemoryError("mhc-lab: no memory for the mHC kernel's scratch")
    return y_in, y_mix, h_post, h_res, logits, inv


def mhc_backward(
    x: torch.Tensor, logits: torch.Tensor, inv: torch.Tensor, bias: torch.Tensor, iters: int,
    grad_in: torch.Tensor, grad_mixed: torch.Tensor, grad_post: Optional[torch.Tensor],
    grad_hres: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of `mhc_forward` up to the projection: grad_x (*lead, n, C) without the
    projection's term (inv * dlogits) @ phi^T, which the caller adds, and dL/dlogits."""
    lead, m, n, c = _streams(x)
    k = 2 * n + n * n
    if iters < 0:
        raise ValueError(f"mhc-lab native mhc: iters must be >= 0, got {iters}")
    grad_x, dlogits = torch.empty_like(x), torch.empty_like(logits)
    fn = _kernel("mhc_mhc_backward", {"x": (x, (*lead, n, c)), "logits": (logits, (*lead, k)), "inv": (inv, lead), "bias": (bias, (k,)), "grad_in": (grad_in, (*lead, c)), "grad_mixed": (grad_mixed, (*lead, n, c)), "grad_post": (grad_post, (*lead, n)), "grad_hres": (grad_hres, (*lead, n, n))}, streams=n)
    if fn(x.data_ptr(), logits.data_ptr(), inv.data_ptr(), bias.data_ptr(), iters, grad_in.data_ptr(),
          grad_mixed.data_ptr(), _ptr(grad_post), _ptr(grad_hres), grad_x.data_ptr(), dlogits.data_ptr(),
          m, n, c, torch.get_num_threads()):
        raise MemoryError("mhc-lab: no memory for the mHC kernel's scratch")
    return grad_x, dlogits
