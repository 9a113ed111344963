"""Helpers of the tests that edit saved folders (imported by test_io, test_io_faults, test_fuzz)."""

import hashlib
import json

import numpy as np
from safetensors.numpy import load_file, save_file

from sksae._io import _canonical


def copy_folder(src, dst):
    """A copy of the saved folder ``src`` at ``dst`` (its two files)."""
    dst.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def forge(folder, edit_config=None, edit_arrays=None):
    """Edit a saved folder and recompute every digest, as a deliberate forger would.

    ``edit_arrays(arrays)`` edits the weights in place (the manifest follows
    them); ``edit_config(cfg)`` edits the configuration. With neither, the
    digests are recomputed for edits made to the files directly.
    """
    cfg = json.loads((folder / "config.json").read_text())
    if edit_arrays is not None:
        arrays = {k: np.array(v) for k, v in load_file(str(folder / "model.safetensors")).items()}
        edit_arrays(arrays)
        save_file(arrays, str(folder / "model.safetensors"))
        cfg["arrays"] = {k: {"dtype": str(v.dtype), "shape": list(v.shape)}
                         for k, v in arrays.items()}
    cfg["weights_sha256"] = hashlib.sha256(
        (folder / "model.safetensors").read_bytes()).hexdigest()
    if edit_config is not None:
        edit_config(cfg)
    body = {k: v for k, v in cfg.items() if k != "config_sha256"}
    cfg["config_sha256"] = hashlib.sha256(_canonical(body)).hexdigest()
    (folder / "config.json").write_text(json.dumps(cfg))
