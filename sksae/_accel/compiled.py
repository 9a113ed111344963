"""The numba-compiled CPU kernels, loaded on first use.

The coders' lasso homotopy (:mod:`._homotopy_nb`) and OMP (:mod:`._omp_nb`,
also the non-negative OMP of the dictionary refinement) run compiled per row
on CPU tensors, and so do the TopK training step's selection
(:mod:`._topk_nb`) and its sparse passes (:mod:`._sparse_nb`). Where a
kernel cannot be loaded (numba broken, say, or ``_USE_NUMBA`` off) the torch
implementations run instead: the coders' torch paths give the same
codes, ``torch.topk`` the same selection (up to ties) and the torch
primitives of :mod:`.sparse` the same sums (up to rounding). Nothing here
imports numba before a kernel is first asked for, so importing sksae stays
fast.
"""

from __future__ import annotations

import importlib

__all__ = ["compiled_backend", "default_engine", "kernel"]

#: Whether the compiled kernels may be used. Private switch: tests and the
#: benchmarks set it to False to force the torch paths on the CPU.
_USE_NUMBA = True

# kernel name -> (module, function)
_SOURCES = {"homotopy": ("sksae._accel._homotopy_nb", "homotopy_rows"),
            "omp": ("sksae._accel._omp_nb", "omp_rows"),
            "nnomp": ("sksae._accel._omp_nb", "nnomp_rows"),
            "topk": ("sksae._accel._topk_nb", "topk_rows"),
            **{name: ("sksae._accel._topk_nb", name)
               for name in ("batch_sample_buckets", "batch_count", "batch_fill", "batch_select")},
            **{name: ("sksae._accel._sparse_nb", name)
               for name in ("transpose", "dots", "decode_backward", "gather_backward",
                            "unit_rows")}}
# kernel name -> the compiled function, or False when it could not be loaded.
_KERNELS = {}


def kernel(name, required=False):
    """The compiled kernel ``name``, or None.

    Parameters
    ----------
    name : str
        A coder's kernel ("homotopy", "omp"; "nnomp", the non-negative OMP of
        :mod:`sksae._refine`), the TopK and BatchTopK selections'
        ("topk", "batch_sample_buckets", "batch_count", "batch_fill",
        "batch_select"; :mod:`sksae._accel._topk_nb`) or one of the sparse training
        passes ("transpose", "dots", "decode_backward", "gather_backward",
        "unit_rows"; :mod:`sksae._accel._sparse_nb`).
    required : bool, default=False
        Load it even when the switch is off, and let a failed import raise
        (an explicit ``engine="numba"``).

    Returns
    -------
    function or None
        None when the switch is off or numba is missing or broken.
    """
    if not (_USE_NUMBA or required):
        return None
    found = _KERNELS.get(name)
    if found is None or (required and found is False):
        module, attr = _SOURCES[name]
        try:
            found = getattr(importlib.import_module(module), attr)
        except Exception:  # noqa: BLE001
            # Not only ImportError: numba raises RuntimeError at decoration when
            # it finds no writable cache directory, for instance.
            if required:
                raise
            found = False
        _KERNELS[name] = found
    return found or None


def compiled_backend():
    """Whether the CPU coders run compiled (numba installed and enabled)."""
    return kernel("homotopy") is not None


def default_engine(device, name):
    """The coder implementation for tensors on ``device``: one rule for every coder.

    ``"numba"`` on the CPU when the compiled kernel ``name`` loads, else
    ``"torch"``.
    """
    if device.type != "cpu" or kernel(name) is None:
        return "torch"
    return "numba"
