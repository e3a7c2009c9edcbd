"""One-pass statistics of CPU tensors in C, built on first use with the system's C compiler.

The eager statistics (:mod:`gradprobe.stats.eager`) take about six reductions per tensor; on a
CPU they are bound by arithmetic, not by memory. ``_native.c`` computes every field of a row
(sum, Σx², Σ|x|, the non-zero and non-finite counts, min, max) in **one pass** with the
compiler's vector extensions, and for a weight also ``Σ (W − W_prev)²`` and ``Σ (W − W0)²`` in
the same pass (no difference tensor is written). Elements are accumulated in blocks of 1024 in the
tensor's precision and the blocks in float64 (the accumulation error of 1024-element sums); the
counts are exact. Many small tensors go through one call.

Measured on one thread of this project's CI machine (AVX-512), 262,144 float32 elements: 0.06 ms
for a row against 0.25-0.40 ms eager (six reductions) and 0.013 ms for the BLAS ``dot`` alone
(one read); a weight's row with both differences 0.11 ms against 0.68 ms. ``benchmarks/
native_kernels.py`` prints these ratios on the machine at hand.

Build. ``_native.c`` and ``_native_body.h`` are compiled with ``$CC`` (else the first of ``cc``,
``gcc``, ``clang`` on ``PATH``), ``-O3 -march=native`` (``-O3`` alone where the compiler refuses
it; never ``-ffast-math``), into ``$GRADPROBE_CACHE_DIR`` (default ``$XDG_CACHE_HOME/gradprobe``
or ``~/.cache/gradprobe``), named by a hash of the sources, the flags and the CPU: a later process
loads it without compiling (about 0.2 s the first time). The file is written under a temporary
name and renamed, so processes that build at once never load half a file. The loaded library is
checked once against the eager path on known tensors.

Mode (environment variable ``GRADPROBE_NATIVE``, or :meth:`NativeKernels.set_mode`):

* ``auto`` (default): the kernels where they build; where they do not (no compiler), the eager
  path, silently, with the reason in :attr:`NativeKernels.broken` and in the run's ``meta.json``
  (``stats_kernels``). A library that builds but disagrees with the eager path warns once;
* ``on`` (``1``): the same, but a failure raises :class:`gradprobe.errors.ConfigError`;
* ``off`` (``0``): eager only.

Served: contiguous float32 and float64 CPU tensors with at least one element, outside
``torch.compile`` tracing. Other tensors (half precision, accelerators, views with strides) take
the eager or compiled path.

Example
    >>> import torch
    >>> from gradprobe.stats import schema
    >>> k = NativeKernels("auto")
    >>> rows = k.rows([torch.tensor([0.0, 3.0, -4.0])]) if k.available() else None
    >>> rows is None or rows[0, schema.SUMSQ].item() == 25.0
    True
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from gradprobe.errors import ConfigError
from gradprobe.stats import eager as E
from gradprobe.stats.schema import N_STATS

Mode = Literal["auto", "on", "off"]

SOURCES = ("_native.c", "_native_body.h")
FLAG_SETS = (("-O3", "-march=native"), ("-O3", "-mcpu=native"), ("-O3",))
"""Compiler flags tried in turn (``-march=native`` is refused by some ARM compilers)."""

DTYPES = {torch.float32: "f32", torch.float64: "f64"}
PLAIN = (torch.Tensor, torch.nn.Parameter)
"""The tensor types whose memory the kernels read (subclasses may hold none: fake tensors)."""


def mode_from_env() -> Mode:
    """The mode named by ``GRADPROBE_NATIVE`` (an unknown value warns and gives ``"auto"``)."""
    v = os.environ.get("GRADPROBE_NATIVE", "").strip().lower()
    if v in ("", "auto"):
        return "auto"
    if v in ("1", "on", "true", "yes"):
        return "on"
    if v in ("0", "off", "false", "no"):
        return "off"
    warnings.warn(f"GRADPROBE_NATIVE={v!r} is not a known value: using auto. Use auto, 1 (on) "
                  "or 0 (off).", RuntimeWarning, stacklevel=2)
    return "auto"


def cache_dir() -> Path:
    """Where built libraries are kept: ``$GRADPROBE_CACHE_DIR``, else ``$XDG_CACHE_HOME/gradprobe``,
    else ``~/.cache/gradprobe``."""
    env = os.environ.get("GRADPROBE_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "gradprobe"


def compiler() -> str | None:
    """``$CC``, else the first of ``cc``, ``gcc``, ``clang`` found on ``PATH``."""
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or cc
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _cpu_id() -> str:
    """What the library depends on: the platform and C library (a home directory shared by
    machines), the machine and, on Linux, the CPU's model and flags (``-march=native``)."""
    ident = platform.platform() + repr(platform.libc_ver()) + platform.machine()
    ident += platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    ident += line
                if line.strip() == "":
                    break  # the first CPU's block is enough
    except OSError:
        pass
    return ident


def _sources() -> str:
    here = Path(__file__).parent
    return "".join((here / s).read_text(encoding="utf-8") for s in SOURCES)


def _check_private(directory: Path) -> None:
    """Refuse a directory that another user could have written a library into (it is loaded
    into this process): on POSIX it must be ours and not writable by group or others (ours
    and writable by them: made private first)."""
    if not hasattr(os, "getuid"):
        return
    st = directory.stat()
    if st.st_uid == os.getuid() and st.st_mode & 0o022:  # ours, made under a umask of 002
        os.chmod(directory, st.st_mode & 0o755)
        st = directory.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise RuntimeError(f"{directory} is not private to this user (owner uid {st.st_uid}, "
                           f"mode {oct(st.st_mode & 0o777)}); set GRADPROBE_CACHE_DIR to a "
                           "directory of your own")


def build(directory: Path | None = None, cc: str | None = None,
          defines: tuple[str, ...] = ()) -> Path:
    """Compile the kernels (or find them built) and return the library's path; raises
    ``RuntimeError`` saying why where that is not possible. ``defines``: extra ``-D`` flags
    (the tests build the portable path with ``("-DGP_PORTABLE",)``)."""
    cc = cc if cc is not None else compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH; set CC to one")
    src = _sources()
    key = hashlib.sha256("\0".join([src, cc, _cpu_id(), repr(FLAG_SETS), *defines]).encode()
                         ).hexdigest()
    suffix = ".dll" if os.name == "nt" else ".so"
    directory = directory if directory is not None else cache_dir()
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        probe = directory / f".write-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError:
        user = os.getuid() if hasattr(os, "getuid") else 0
        directory = Path(tempfile.gettempdir()) / f"gradprobe-{user}"
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_private(directory)
    lib = directory / f"stats-{key[:20]}{suffix}"
    if lib.exists():
        return lib
    here = Path(__file__).parent
    tmp = directory / f".stats-{key[:20]}-{os.getpid()}{suffix}"
    errors = []
    for flags in FLAG_SETS:
        cmd = [cc, *flags, *defines, "-shared", "-fPIC", "-o", str(tmp), str(here / SOURCES[0])]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RuntimeError(f"the C compiler {cc!r} could not run: {e}") from e
        if res.returncode == 0:
            os.replace(tmp, lib)
            return lib
        said = (res.stderr or res.stdout).strip().splitlines()
        errors.append(f"{' '.join(flags)}: {said[-1] if said else f'exit status {res.returncode}'}")
    tmp.unlink(missing_ok=True)
    raise RuntimeError(f"{cc} could not compile {SOURCES[0]} ({'; '.join(errors)})")


def _check_tensors(dtype: torch.dtype) -> list[Tensor]:
    """Known inputs for the load-time check: small integers (every sum exact in both paths),
    lengths that leave a tail, zeros, and a copy with NaN and Inf."""
    n = 3 * 1024 + 35  # 3107 = 13 x 239: a tail after the blocks, and rows of 13
    x = (torch.arange(n, dtype=torch.float64) * 7 % 9 - 4).to(dtype)
    y = x.clone()
    y[5], y[n - 3] = float("nan"), float("inf")
    return [x, y, x[:5].clone(), torch.zeros(1, dtype=dtype)]


class NativeKernels:
    """The C kernels of one process: the mode, the loaded library and why it is not used
    (``broken``). Built and checked on first use."""

    def __init__(self, mode: Mode = "auto") -> None:
        self.mode: Mode = "auto"
        self.broken: str | None = None
        self.path: Path | None = None
        self._lib: ctypes.CDLL | None = None
        self._tried = False
        self.defines: tuple[str, ...] = ()  # extra -D flags of the build (tests)
        self.set_mode(mode)

    @classmethod
    def from_env(cls) -> NativeKernels:
        return cls(mode_from_env())

    def set_mode(self, value: Mode) -> None:
        """Select ``"auto"``, ``"on"`` or ``"off"`` (and try to build again after a failure)."""
        if value not in ("auto", "on", "off"):
            raise ConfigError(f"native mode must be 'auto', 'on' or 'off', not {value!r}",
                              hint='e.g. gradprobe.stats.native.NATIVE.set_mode("off")')
        self.mode = value
        self.broken = None
        self._tried = self._lib is not None

    def available(self) -> bool:
        """True where the kernels are built, loaded and checked (building them if needed)."""
        if self.mode == "off":
            return False
        if not self._tried:
            self._tried = True
            self._load()
        return self._lib is not None

    def describe(self) -> str:
        """One line for ``meta.json``: whether the C kernels serve, or why not."""
        if self.mode == "off":
            return "eager (C kernels off: GRADPROBE_NATIVE=0)"
        if self.available():
            return "C kernels for float32/64, eager otherwise"
        return f"eager (C kernels unavailable: {self.broken})"

    def usable(self, x: Tensor) -> bool:
        """True where the C kernels summarise ``x``: a plain (not a subclass: no fake, no
        distributed tensor) contiguous float32/float64 CPU tensor with at least one element and
        no lazy negation, outside ``torch.compile`` tracing."""
        return self.serves([x])

    def serves(self, ts: Sequence[Tensor]) -> bool:
        """:meth:`usable` of every tensor of ``ts`` (the checks that do not depend on the tensor
        made once: this runs on every step)."""
        if not ts or torch.compiler.is_compiling() or not self.available():
            return False
        return all(type(t) in PLAIN and t.dtype in DTYPES and t.is_cpu
                   and t.layout is torch.strided and t.numel() > 0 and t.is_contiguous()
                   and not t.is_neg() for t in ts)

    def _load(self) -> None:
        try:
            self.path = build(defines=self.defines)
            try:
                lib = ctypes.CDLL(str(self.path))
            except OSError:  # a damaged file under the right name: build it again, once
                self.path.unlink(missing_ok=True)
                self.path = build(defines=self.defines)
                lib = ctypes.CDLL(str(self.path))
            if lib.gp_layout() // 100 != N_STATS:
                raise RuntimeError(f"{self.path} lays rows out for {lib.gp_layout() // 100} "
                                   f"fields, not {N_STATS}")
            for suf in DTYPES.values():
                getattr(lib, f"gp_rows_{suf}").argtypes = [ctypes.c_int64, ctypes.c_void_p,
                                                           ctypes.c_void_p, ctypes.c_void_p]
                getattr(lib, f"gp_norms_{suf}").argtypes = [ctypes.c_int64, ctypes.c_void_p,
                                                            ctypes.c_void_p, ctypes.c_void_p]
                getattr(lib, f"gp_blocks_{suf}").argtypes = [ctypes.c_void_p] + [
                    ctypes.c_int64] * 4 + [ctypes.c_void_p]
                getattr(lib, f"gp_weight_{suf}").argtypes = [ctypes.c_void_p] * 3 + [
                    ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
            self._lib = lib
        except Exception as e:
            self._fail(e, warn=False)
            return
        try:
            self._check()
        except Exception as e:
            self._lib = None
            self._fail(e, warn=True)

    def _fail(self, e: Exception, warn: bool) -> None:
        self.broken = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if self.mode == "on":
            raise ConfigError(f"the native statistics kernels are unavailable: {self.broken}",
                              hint="install a C compiler (or set CC), or set GRADPROBE_NATIVE=auto "
                                   "to fall back to the eager kernels") from e
        if warn:
            warnings.warn(f"gradprobe: native statistics kernels disabled ({self.broken}); using "
                          "the eager path. Set GRADPROBE_NATIVE=0 to skip them.", RuntimeWarning,
                          stacklevel=5)

    def _check(self) -> None:
        for dtype in DTYPES:
            cs = _check_tensors(dtype)
            got = self._rows(cs)
            want = E.fix_nonfinite_(cs, E.chunked_stats(cs))
            prev, init = cs[0].flip(0), cs[0] * 0.5
            w = self._weight(cs[0], prev, init, 13)
            cf = cs[0].double()
            want_w = torch.cat([want[0], ((cf - prev.double()) ** 2).sum().reshape(1),
                                ((cf - init.double()) ** 2).sum().reshape(1),
                                cf.reshape(-1, 13).sum(0).square().sum().reshape(1)])
            norms = torch.empty(len(cs))
            if not self.norms_into(cs, norms) or not torch.allclose(
                    norms, torch.stack(torch._foreach_norm(cs)).float(), rtol=1e-6,
                    equal_nan=True):
                raise RuntimeError(f"{self.path} disagrees with torch's norms on known {dtype} "
                                   f"tensors: {norms.tolist()}")
            if not (torch.equal(got.isnan(), want.isnan())
                    and torch.allclose(got, want, rtol=1e-6, atol=0.0, equal_nan=True)
                    and torch.allclose(w, want_w, rtol=1e-6, atol=0.0)):
                raise RuntimeError(f"{self.path} disagrees with the eager statistics on known "
                                   f"{dtype} tensors: {got.tolist()} != {want.tolist()}")

    def _rows(self, ts: Sequence[Tensor]) -> Tensor:
        assert self._lib is not None
        k = len(ts)
        out = torch.zeros(k, N_STATS, dtype=torch.float64)
        dtypes = {t.dtype for t in ts}
        for dt in dtypes:
            idx = [i for i, t in enumerate(ts) if t.dtype == dt] if len(dtypes) > 1 else None
            sel = ts if idx is None else [ts[i] for i in idx]
            m = len(sel)
            ptrs = (ctypes.c_int64 * m)(*[t.data_ptr() for t in sel])
            ns = (ctypes.c_int64 * m)(*[t.numel() for t in sel])
            dst = out if idx is None else torch.zeros(m, N_STATS, dtype=torch.float64)
            getattr(self._lib, f"gp_rows_{DTYPES[dt]}")(m, ptrs, ns, dst.data_ptr())
            if idx is not None:
                out[idx] = dst
        return out

    def _weight(self, w: Tensor, prev: Tensor | None, init: Tensor | None, cols: int
                ) -> Tensor:
        assert self._lib is not None
        out = torch.zeros(N_STATS + 3, dtype=torch.float64)
        failed = getattr(self._lib, f"gp_weight_{DTYPES[w.dtype]}")(
            w.data_ptr(), None if prev is None else prev.data_ptr(),
            None if init is None else init.data_ptr(), w.numel(), cols, out.data_ptr())
        return out[: N_STATS + 2] if failed else out  # failed: no memory for the column sums

    def rows(self, ts: Sequence[Tensor]) -> Tensor | None:
        """``[len(ts), N_STATS]`` float64 rows (``saturated``, ``dead`` and ``ref_sumsq`` 0,
        exact counts) of tensors for which :meth:`usable` holds, or ``None`` where the kernels
        are unavailable."""
        if not ts or not self.available():
            return None
        return self._rows(ts)

    def norms_into(self, grads: Sequence[Tensor], out: Tensor, sizes: Any = None) -> bool:
        """Write ``‖g‖₂`` of each gradient into ``out`` (a contiguous float32 CPU vector of
        ``len(grads)`` elements: the always-on row's gradient columns) in one call; False,
        writing nothing, where the kernels do not serve them. ``grads`` are the gradients of
        parameters of one device and dtype, and torch keeps a gradient's device, dtype and size
        those of its parameter: only the first one's device and dtype are checked, and
        ``sizes`` (a ``ctypes`` int64 array of the parameters' sizes, made once by the caller)
        may stand for the sizes. This runs on every step, for every parameter."""
        g0 = grads[0] if grads else None
        if g0 is None or not g0.is_cpu or out.numel() != len(grads) or not self.available():
            return False  # before the loop over the gradients
        strided = torch.strided
        if not all(type(g) in PLAIN and g.layout is strided and g.is_contiguous()
                   and not g.is_neg() for g in grads):
            return False
        k = len(grads)
        ptrs = (ctypes.c_int64 * k)(*[g.data_ptr() for g in grads])
        ns = sizes if sizes is not None else (ctypes.c_int64 * k)(*[g.numel() for g in grads])
        return self.norms_at(g0.dtype, ptrs, ns, out)

    def norms_at(self, dtype: torch.dtype, ptrs: Any, sizes: Any, out: Tensor) -> bool:
        """:meth:`norms_into` for memory the caller owns and has checked: ``ptrs`` and
        ``sizes`` (``ctypes`` int64 arrays, made once) address contiguous ``dtype`` vectors on
        the CPU (the stage's rows: :meth:`gradprobe.capture.staged.StagedSteps.grad_norms_into`);
        ``out`` as for :meth:`norms_into`. False, writing nothing, where the kernels are
        unavailable or do not serve ``dtype`` or ``out``."""
        if (dtype not in DTYPES or out.dtype != torch.float32 or out.device.type != "cpu"
                or not out.is_contiguous() or out.numel() != len(ptrs)
                or torch.compiler.is_compiling() or not self.available()):
            return False
        assert self._lib is not None
        getattr(self._lib, f"gp_norms_{DTYPES[dtype]}")(len(ptrs), ptrs, sizes, out.data_ptr())
        return True

    def blocks(self, v: Tensor) -> Tensor | None:
        """``[S, m, N_STATS]`` rows of the ``S × m`` rows of ``v`` (``[S, m, n]``, each ``[m, n]``
        block contiguous, any stride between blocks: the stage's runs), or ``None`` where the
        kernels do not serve ``v``."""
        if (type(v) not in PLAIN or v.is_neg() or v.ndim != 3 or v.dtype not in DTYPES
                or v.device.type != "cpu" or v.numel() == 0
                or v.stride(2) != 1 or v.stride(1) != v.shape[2]
                or torch.compiler.is_compiling() or not self.available()):
            return None
        assert self._lib is not None
        s, m, n = v.shape
        out = torch.zeros(s, m, N_STATS, dtype=torch.float64)
        getattr(self._lib, f"gp_blocks_{DTYPES[v.dtype]}")(
            v.data_ptr(), s, v.stride(0), m, n, out.data_ptr())
        return out

    def weight_stats(self, w: Tensor, prev: Tensor | None, init: Tensor | None,
                     cols: int = 0) -> Tensor | None:
        """``[N_STATS + 3]``: the row of ``w``, then ``Σ (w − prev)²`` and ``Σ (w − init)²``
        (0 where that tensor is ``None``), in one pass; then, where ``cols > 0`` divides the
        size, ``Σ_j (Σ_i w[i, j])²`` of ``w`` seen as rows of ``cols`` elements (the column sums
        of :mod:`gradprobe.stats.spread`; 0 where ``cols`` is 0; ``[N_STATS + 2]`` where they
        could not be formed). ``None`` where the kernels do not serve these tensors."""
        if not self.serves([w, *(o for o in (prev, init) if o is not None)]):
            return None
        if any(o is not None and (o.dtype != w.dtype or o.numel() != w.numel())
               for o in (prev, init)):
            return None
        return self._weight(w, prev, init, cols)


NATIVE = NativeKernels.from_env()
"""The process-wide kernels the Probe uses. Set the mode with ``NATIVE.set_mode("off")`` or the
environment variable ``GRADPROBE_NATIVE``."""


__all__ = ["NATIVE", "NativeKernels", "build", "cache_dir", "compiler", "mode_from_env"]
