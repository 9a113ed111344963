"""The documentation builds with warnings as errors (examples are not executed here)."""

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_api_reference_lists_every_public_name():
    import sksae

    api = (DOCS / "api.rst").read_text()
    listed = set(re.findall(r"^   (\w+)$", api, flags=re.M))
    names = {n for n in sksae.__all__ if n != "__version__" and not n.islower()}
    names |= {"sparse_encode", "save", "load"}
    for module in ("architectures", "datasets", "metrics", "model_selection", "plotting",
                   "interop"):
        names |= set(importlib.import_module(f"sksae.{module}").__all__)
    assert names <= listed, sorted(names - listed)


def test_docs_build_without_warnings(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("numpydoc")
    pytest.importorskip("sphinx_gallery")
    pytest.importorskip("pydata_sphinx_theme")
    from sphinx.cmd.build import build_main

    src = tmp_path / "docs"
    import shutil

    shutil.copytree(DOCS, src, ignore=shutil.ignore_patterns("_build", "generated",
                                                             "auto_examples"))
    # conf.py points sphinx-gallery at ../examples relative to the copy
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    # pages include benchmark results from ../benchmarks/results
    shutil.copytree(ROOT / "benchmarks" / "results", tmp_path / "benchmarks" / "results")
    status = build_main(["-W", "--keep-going", "-q", "-b", "html",
                         "-D", "plot_gallery=0", str(src), str(tmp_path / "html")])
    assert status == 0
    assert (tmp_path / "html" / "api.html").is_file()
    assert (tmp_path / "html" / "generated" / "sksae.SparseAutoencoder.html").is_file()
