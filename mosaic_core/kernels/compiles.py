"""How many variants of Mosaic's own Triton kernels this process has compiled (or loaded from Triton's disk cache).

Triton makes a kernel variant per set of compile-time constants and argument traits (an integer's divisibility by
16, for one) the first time a launch asks for it, on the launching thread: about a second for a new one on the H100,
during which a question's first token or a camera's frames wait (bench/NOTES.md, session 40: TTFT p99 538 ms in
the service's first step). The engine's warm-up is meant to make every variant users' work needs; a count that
still grows after it says which work it missed.

``install`` chains a counter into Triton's post-compile hook, once per process. Variants that torch.compile makes
(Inductor compiles its kernels apart from that hook) are not counted. Without a Triton that has the hook (``knobs``,
Triton 3.4 on), ``total`` stays None.
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_count = [0]  # variants compiled since ``install``
_installed: list[bool] = []  # [True] once the hook is in, [False] when Triton has no hook to chain into


def install() -> bool:
    """Starts counting (idempotent); False when this Triton has no post-compile hook."""
    with _lock:
        if _installed:
            return _installed[0]
        try:
            from triton import knobs
        except ImportError:
            _installed.append(False)
            return False
        runtime = knobs.runtime
        previous = runtime.jit_post_compile_hook

        def counted(*args, **kwargs):
            fn = kwargs.get("fn")
            if fn is not None and getattr(fn, "module", "").startswith("mosaic_core."):
                with _lock:
                    _count[0] += 1
            return previous(*args, **kwargs) if previous is not None else None

        runtime.jit_post_compile_hook = counted
        _installed.append(True)
        return True


def total() -> int | None:
    """Variants compiled since ``install``; None when nothing is counted (not installed, or no hook)."""
    with _lock:
        if not _installed or not _installed[0]:
            return None
        return _count[0]
