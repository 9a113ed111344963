"""A feature browser: one self-contained HTML file to look at what each latent of an SAE does.

:func:`feature_browser` encodes an evaluation set (an array, memory map or
activation store, chunk by chunk) and writes one HTML file that opens
offline in any browser: no CDN, no server, the data embedded as JSON and
drawn by a few hundred lines of plain JavaScript. It has

- a summary page: the core metrics of :func:`sksae.metrics.evaluate` (and
  the loss recovered, when given) and the histogram of latent densities on
  a log scale, as SAELens, SAEBench and Neuronpedia draw it;
- a latent picker (by index, from a list sortable by density, previous and
  next, or the page's ``#latent=N`` address); for each latent its density,
  the histogram of its non-zero activations, its nearest latents by decoder
  cosine, and its top-activating inputs: rows, or tokens in context
  highlighted by the latent's activation when the rows are token positions
  (a harvested store's :meth:`~sksae.activations.ActivationStore.positions`)
  and the token ids or strings are given.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np
import torch

__all__ = ["feature_browser"]


def _dense(codes):
    codes = codes.toarray() if hasattr(codes, "toarray") else np.asarray(codes)
    return np.asarray(codes, dtype=np.float32)


def _take(X, rows):
    """Rows ``rows`` (sorted, distinct) of an array, memory map or store, as a numpy array."""
    from ._data import Rows, is_out_of_core

    if is_out_of_core(X):
        R = Rows(X)
        t = R.take(rows)
        return t.to(torch.float64 if R.dtype == np.float64 else torch.float32).numpy()
    return np.asarray(X)[rows]


def _scan(estimator, X, n_components, n_top, chunk_rows, sums):
    """First pass: per-latent counts, largest |activation|, top rows; the core sums."""
    from .metrics import _chunks

    count = np.zeros(n_components, dtype=np.int64)
    top_abs = torch.full((n_top, n_components), -1.0)
    top_val = torch.zeros((n_top, n_components))
    top_row = torch.full((n_top, n_components), -1, dtype=torch.int64)
    for start, chunk in _chunks(X, chunk_rows):
        codes = estimator.transform(chunk)
        if sums is not None:
            x_hat = (estimator.inverse_transform(codes) if hasattr(estimator, "inverse_transform")
                     else codes @ estimator.components_)
            sums.add(chunk, np.asarray(x_hat), codes)
        z = torch.from_numpy(_dense(codes))
        count += (z != 0).sum(0).numpy()
        k = min(n_top, z.shape[0])
        a, i = z.abs().topk(k, dim=0)
        v = z.gather(0, i)
        all_abs = torch.cat([top_abs, a])
        keep = all_abs.topk(n_top, dim=0).indices
        top_abs = all_abs.gather(0, keep)
        top_val = torch.cat([top_val, v]).gather(0, keep)
        top_row = torch.cat([top_row, i + start]).gather(0, keep)
    return count, top_abs.numpy(), top_val.numpy(), top_row.numpy()


def _histograms(estimator, X, peak, bins, chunk_rows):
    """Second pass: per latent, counts of its non-zero |activations| in ``bins`` bins of [0, peak]."""
    from .metrics import _chunks

    n_components = len(peak)
    hist = np.zeros(n_components * bins, dtype=np.int64)
    scale = np.where(peak > 0, bins / np.where(peak > 0, peak, 1), 0.0)
    for _, chunk in _chunks(X, chunk_rows):
        z = _dense(estimator.transform(chunk))
        rows, cols = np.nonzero(z)
        b = np.minimum((np.abs(z[rows, cols]) * scale[cols]).astype(np.int64), bins - 1)
        hist += np.bincount(cols * bins + b, minlength=n_components * bins)
    return hist.reshape(n_components, bins)


def _neighbours(components, latents, n, block_bytes=64 * 2**20):
    """For each latent, its ``n`` nearest other latents by decoder cosine.

    In the dictionary's precision (float32 for a float32 dictionary: a float64
    copy of 1M x 4096 atoms would be 32 GB), ``block_bytes`` of cosines at a
    time, the ``n`` largest of each row picked before they are sorted.
    """
    W = np.asarray(components)
    W = W.astype(np.result_type(W.dtype, np.float32), copy=False)
    W = W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-12)
    n = min(n, len(W) - 1)
    out = {}
    if n < 1:
        return {int(latent): [] for latent in latents}
    block = max(1, block_bytes // (len(W) * W.itemsize))
    for lo in range(0, len(latents), block):
        part = latents[lo:lo + block]
        cos = W[part] @ W.T
        cos[np.arange(len(part)), part] = -np.inf
        top = np.argpartition(-cos, n - 1, axis=1)[:, :n]
        for j, latent in enumerate(part):
            # the nearest first; equal cosines in the order of the latents
            idx = top[j][np.lexsort((top[j], -cos[j, top[j]]))]
            out[int(latent)] = [[int(i), round(float(cos[j, i]), 4)] for i in idx]
    return out


def _display_tokens(strings):
    """Token strings as shown.

    WordPiece's ``##`` joins the previous token and SentencePiece's ``▁`` and
    byte-level BPE's ``Ġ`` are spaces; tokens without such markers are
    separated by spaces.
    """
    marked = any(s[:1] in ("Ġ", "▁", " ") for s in strings)
    out = []
    for s in strings:
        if s.startswith("##") and len(s) > 2:
            out.append(s[2:])
        elif s[:1] in ("Ġ", "▁"):
            out.append(" " + s[1:])
        elif not marked:
            out.append(" " + s)
        else:
            out.append(s)
    return out


def _token_strings(tokens, tokenizer, seq):
    ids = list(np.asarray(tokens[seq]).tolist()) if not isinstance(tokens[seq], (list, tuple)) \
        else list(tokens[seq])
    if ids and isinstance(ids[0], str):
        return ids
    pad = getattr(tokenizer, "pad_token_id", None)
    while pad is not None and ids and ids[-1] == pad:  # a padded batch's padding
        ids.pop()
    if tokenizer is None:
        return [str(i) for i in ids]
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        return [str(t) for t in tokenizer.convert_ids_to_tokens([int(i) for i in ids])]
    return [str(t) for t in tokenizer([int(i) for i in ids])]


class _SortedPositions:
    """Rows by (sequence, position), from every row's positions given in memory."""

    def __init__(self, positions):
        self.positions = positions
        self.stride = int(positions[:, 1].max()) + 1 if len(positions) else 1
        keys = positions[:, 0] * self.stride + positions[:, 1]
        self.order = np.argsort(keys, kind="stable")
        self.keys = keys[self.order]

    def of(self, row):
        """``(sequence, position)`` of ``row``."""
        return tuple(int(v) for v in self.positions[row])

    def rows(self, row, seq, pos, lo, hi):
        """The rows at positions ``lo:hi`` of sequence ``seq`` (-1 where none), around
        ``row`` (at position ``pos`` of it)."""
        want = seq * self.stride + np.arange(lo, hi)
        at = np.minimum(np.searchsorted(self.keys, want), len(self.keys) - 1)
        return np.where(self.keys[at] == want, self.order[at], -1)


class _StorePositions:
    """Rows by (sequence, position), read from a harvested store near the rows asked about.

    Every row's positions at once would be 16 bytes a row, and their sort 24
    more: 40 GB for 10^9 rows. A harvest writes the rows of a sequence
    together, in the order of their positions (masked tokens left out), so
    the rows at positions ``lo:hi`` of ``row``'s sequence lie within
    ``row - (pos - lo)`` and ``row + (hi - 1 - pos)``: only those are read.
    """

    def __init__(self, store):
        self.store = store
        self.n_rows = store.shape[0]
        store.positions(0, min(1, self.n_rows))  # a store without positions raises here

    def of(self, row):
        return tuple(int(v) for v in self.store.positions(row, row + 1)[0])

    def rows(self, row, seq, pos, lo, hi):
        a, b = max(0, row - (pos - lo)), min(self.n_rows, row + (hi - pos))
        near = self.store.positions(a, b)
        out = np.full(hi - lo, -1, dtype=np.int64)
        same = (near[:, 0] == seq) & (near[:, 1] >= lo) & (near[:, 1] < hi)
        out[near[same, 1] - lo] = np.arange(a, b)[same]
        return out


def _contexts(estimator, X, examples, where, tokens, tokenizer, context, chunk_rows):
    """Token windows around each example, with the latent's activation at every token.

    ``examples``: (latent, row) pairs; ``where``: the rows' positions
    (:class:`_SortedPositions` or :class:`_StorePositions`). Returns
    ``{(latent, row): (strings, acts, centre)}``.
    """
    windows, wanted = {}, {}
    cache = {}
    for latent, row in examples:
        seq, pos = where.of(row)
        if seq not in cache:
            cache[seq] = _display_tokens(_token_strings(tokens, tokenizer, seq))
        strings = cache[seq]
        lo, hi = max(0, pos - context), min(len(strings), pos + context + 1)
        rows = where.rows(row, seq, pos, lo, hi)
        windows[(latent, row)] = (strings[lo:hi], rows, pos - lo)
        for r in rows[rows >= 0]:
            wanted.setdefault(int(r), set()).add(latent)
    # the latents' activations at the window rows, encoded chunk by chunk
    need = np.array(sorted(wanted), dtype=np.int64)
    value = {}
    for lo in range(0, len(need), chunk_rows):
        part = need[lo:lo + chunk_rows]
        z = _dense(estimator.transform(_take(X, part)))
        for j, r in enumerate(part):
            for latent in wanted[int(r)]:
                value[(int(r), latent)] = float(z[j, latent])
    out = {}
    for (latent, row), (strings, rows, centre) in windows.items():
        acts = [value.get((int(r), latent), 0.0) if r >= 0 else None for r in rows]
        out[(latent, row)] = (strings, acts, centre)
    return out


def _metric_table(metrics):
    table = {}
    for key, value in dict(metrics).items():
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
            table[key] = float(value) if math.isfinite(float(value)) else None
    return table


def feature_browser(estimator, X, path, *, tokens=None, tokenizer=None, positions=None,
                    metrics=None, latents=None, n_top=10, context=6, bins=24,
                    n_neighbours=6, title=None, chunk_rows=None):
    """Write a self-contained HTML feature browser of a fitted SAE over the rows ``X``.

    ``X`` is read and encoded twice, ``chunk_rows`` rows at a time (bounded
    memory): once for each latent's firing count, largest activation and
    top rows (and the core metrics), once for its activation histogram.
    The file embeds everything it shows and loads nothing (no CDN, no
    server); its JavaScript only draws.

    Parameters
    ----------
    estimator : fitted estimator
        A :class:`~sksae.SparseAutoencoder`, or any fitted dictionary with
        ``transform`` and ``components_`` (signed codes are ranked by
        absolute value).
    X : array-like, memory map or activation store of shape (n_samples, n_features)
        The rows to browse.
    path : path-like
        The HTML file to write.
    tokens : sequence of sequences, default=None
        The token ids (or strings) of every input sequence, indexed by the
        sequence numbers of ``positions`` (e.g. the ``input_ids`` of the
        batches that were harvested, in order). With them the top rows are
        shown as tokens in context.
    tokenizer : tokenizer or callable, default=None
        Turns ids into strings: an object with ``convert_ids_to_tokens``
        (transformers) or a function of a list of ids. None shows the ids.
    positions : array-like of shape (n_samples, 2), default=None
        ``(sequence, position)`` of every row; None reads them from ``X``
        when it is a store written by :func:`~sksae.activations.harvest`:
        only around the rows shown for the store or a run of its rows (the
        harvest's order puts a sequence's tokens on consecutive rows), every
        row's for other subsets (a shuffled fold).
    metrics : dict or Bunch, default=None
        Numbers for the summary page, e.g. the result of
        :func:`sksae.metrics.evaluate` with a model (loss recovered); None
        computes the core metrics in the first pass.
    latents : array-like of int, default=None
        The latents to include; None: all of them.
    n_top : int, default=10
        Top-activating rows shown per latent.
    context : int, default=6
        Tokens shown on each side of a top token.
    bins : int, default=24
        Bins of each latent's activation histogram.
    n_neighbours : int, default=6
        Nearest latents by decoder cosine shown per latent.
    title : str, default=None
        The page's title.
    chunk_rows : int, default=None
        Rows encoded at a time; None keeps a chunk's dense codes near 64 MiB.

    Returns
    -------
    path : pathlib.Path
        The written file.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from sksae import SparseAutoencoder
    >>> from sksae.report import feature_browser
    >>> X = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    >>> sae = SparseAutoencoder(n_components=16, k=3, max_iter=2, random_state=0).fit(X)
    >>> page = feature_browser(sae, X, os.path.join(tempfile.mkdtemp(), "browser.html"))
    >>> page.read_text().startswith("<!DOCTYPE html>")
    True
    """
    from ._base import inference_chunk_rows
    from .metrics import _CoreSums

    if int(n_top) < 1 or int(bins) < 1 or int(context) < 0 or int(n_neighbours) < 0:
        raise ValueError("n_top and bins must be >= 1, context and n_neighbours >= 0.")
    components = np.asarray(estimator.components_)
    n_components, n_features = components.shape
    if chunk_rows is None:
        chunk_rows = inference_chunk_rows(max(n_components, n_features), 4, 64 * 2**20)
    chunk_rows = int(chunk_rows)
    where = None
    if positions is not None:
        positions = np.asarray(positions, dtype=np.int64)
        if positions.shape != (X.shape[0], 2):
            raise ValueError(f"positions must have shape ({X.shape[0]}, 2), one (sequence, "
                             f"position) per row; got {positions.shape}.")
        where = _SortedPositions(positions)
    elif tokens is not None and hasattr(X, "positions"):
        # a store in harvest order (whole, or a run of its rows) is read around the rows
        # shown; another subset (a shuffled fold) is not in sequence order: every row's
        rows = getattr(X, "_rows", None)
        in_order = rows is None or (isinstance(rows, range) and rows.step == 1)
        where = _StorePositions(X) if in_order else _SortedPositions(X.positions())
    sums = _CoreSums(n_features, n_components) if metrics is None else None
    count, top_abs, top_val, top_row = _scan(estimator, X, n_components, int(n_top),
                                             chunk_rows, sums)
    n_rows = int(X.shape[0])
    metrics = sums.result() if metrics is None else metrics
    peak = top_abs[0].clip(min=0)
    hist = _histograms(estimator, X, peak, int(bins), chunk_rows)
    chosen = np.arange(n_components) if latents is None else np.unique(np.asarray(latents))
    neighbours = _neighbours(components, chosen, int(n_neighbours)) if n_neighbours else {}
    examples = [(int(f), int(top_row[j, f])) for f in chosen for j in range(int(n_top))
                if top_abs[j, f] > 0]
    shown = {}
    if tokens is not None and where is not None and examples:
        shown = _contexts(estimator, X, examples, where, tokens, tokenizer, int(context),
                          chunk_rows)
    vocab, vocab_index = [], {}

    def vid(s):
        if s not in vocab_index:
            vocab_index[s] = len(vocab)
            vocab.append(s)
        return vocab_index[s]

    items = []
    for f in chosen:
        f = int(f)
        ex = []
        for j in range(int(n_top)):
            if top_abs[j, f] <= 0:
                break
            row = int(top_row[j, f])
            entry = {"row": row, "act": float(f"{top_val[j, f]:.6g}")}
            if where is not None:
                entry["seq"], entry["pos"] = where.of(row)
            if (f, row) in shown:
                strings, acts, centre = shown[(f, row)]
                entry["toks"] = [vid(s) for s in strings]
                entry["acts"] = [None if a is None else float(f"{a:.4g}") for a in acts]
                entry["centre"] = int(centre)
            ex.append(entry)
        items.append({"id": f, "density": count[f] / n_rows, "max": float(peak[f]),
                      "hist": hist[f].tolist(), "nn": neighbours.get(f, []), "ex": ex})
    density = count / n_rows
    alive = density[density > 0]
    lo = math.floor(np.log10(alive.min())) if alive.size else -6
    edges = np.linspace(lo, 0, 4 * (0 - lo) + 1) if lo < 0 else np.array([-1.0, 0.0])
    log_counts = np.histogram(np.log10(alive), bins=edges)[0] if alive.size else \
        np.zeros(len(edges) - 1, dtype=int)
    data = {
        "title": title or f"{type(estimator).__name__}: {n_components} latents",
        "n_rows": n_rows, "n_components": int(n_components), "n_features": int(n_features),
        "metrics": _metric_table(metrics), "tokens": bool(shown),
        "density": {"edges": [round(float(e), 4) for e in edges],
                    "counts": log_counts.tolist(), "dead": int((density == 0).sum())},
        "latents": items, "vocab": vocab,
    }
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False)
    payload = payload.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    page = _PAGE.replace("__TITLE__", html.escape(data["title"])).replace("__DATA__", payload)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2230;
 background:#f6f7f9}
header{background:#24304a;color:#fff;padding:10px 18px;display:flex;gap:18px;
 align-items:center;flex-wrap:wrap}
header h1{font-size:17px;margin:0;font-weight:600}
nav button{background:none;border:1px solid #8fa0c8;color:#fff;padding:4px 12px;
 border-radius:4px;cursor:pointer;margin-right:4px}
nav button.on{background:#fff;color:#24304a}
main{padding:14px 18px;max-width:1100px}
.card{background:#fff;border:1px solid #dde1e8;border-radius:6px;padding:12px 14px;
 margin-bottom:12px}
h2{font-size:15px;margin:0 0 8px 0}
table{border-collapse:collapse}
td{padding:2px 14px 2px 0;font-variant-numeric:tabular-nums}
td:first-child{color:#4a5470}
.picker{display:flex;gap:8px;align-items:center;flex-wrap:wrap}
.picker input{width:80px}
.stats span{margin-right:18px}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:12px}
.nn a{margin-right:10px;cursor:pointer;color:#2753b8;text-decoration:underline}
.ex{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;padding:3px 0;
 border-bottom:1px solid #eef0f4;white-space:pre-wrap}
.ex .val{display:inline-block;width:78px;color:#4a5470}
.tok{border-radius:2px}
.tok.centre{outline:1.5px solid #b8461b}
svg text{font-size:10px;fill:#4a5470}
.muted{color:#6b7490}
</style>
</head>
<body>
<header><h1 id="title"></h1>
<nav><button id="tab-summary" class="on">Summary</button><button id="tab-latents">Latents</button></nav>
</header>
<main>
<section id="summary">
<div class="card"><h2>Core metrics</h2><table id="metrics"></table></div>
<div class="card"><h2>Latent density (fraction of rows where a latent fires, log scale)</h2>
<div id="density"></div><div id="dead" class="muted"></div></div>
</section>
<section id="latents" hidden>
<div class="card picker">
<label>Latent <input id="latent-input" type="number" min="0"></label>
<button id="prev">&#9664;</button><button id="next">&#9654;</button>
<select id="latent-select"></select>
<label>order <select id="order"><option value="index">by index</option>
<option value="density">by density</option></select></label>
</div>
<div id="view"></div>
</section>
</main>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const byId = new Map(D.latents.map((l, i) => [l.id, i]));
let order = D.latents.map((l, i) => i);
let current = 0;
const el = (tag, attrs, text) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
};
const svgEl = (tag, attrs) => {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
};
const fmt = (x) => x === null ? "n/a" : (Math.abs(x) >= 1000 || (x !== 0 && Math.abs(x) < 1e-3)
  ? x.toExponential(3) : (Number.isInteger(x) ? String(x) : x.toFixed(4)));
const pct = (x) => (100 * x).toPrecision(3) + "%";

function bars(counts, labels, width, height, colour) {
  const svg = svgEl("svg", {width: width, height: height + 28, role: "img"});
  const max = Math.max(1, ...counts);
  const w = width / Math.max(1, counts.length);
  counts.forEach((c, i) => {
    const h = height * c / max;
    const r = svgEl("rect", {x: i * w + 1, y: height - h, width: Math.max(1, w - 2), height: h,
                             fill: colour});
    const t = svgEl("title", {});
    t.textContent = labels[i] + ": " + c;
    r.appendChild(t);
    svg.appendChild(r);
  });
  svg.appendChild(svgEl("line", {x1: 0, y1: height, x2: width, y2: height, stroke: "#888"}));
  const ticks = [0, Math.floor(counts.length / 2), counts.length - 1];
  for (const i of ticks) {
    const t = svgEl("text", {x: Math.min(width - 40, i * w), y: height + 14});
    t.textContent = labels[i];
    svg.appendChild(t);
  }
  return svg;
}

function summary() {
  document.getElementById("title").textContent = D.title;
  const table = document.getElementById("metrics");
  const rows = [["rows", D.n_rows], ["features", D.n_features], ["latents", D.n_components],
                ...Object.entries(D.metrics)];
  for (const [k, v] of rows) {
    const tr = el("tr");
    tr.appendChild(el("td", {}, k));
    tr.appendChild(el("td", {}, typeof v === "number" ? fmt(v) : String(v)));
    table.appendChild(tr);
  }
  const e = D.density.edges;
  const labels = D.density.counts.map((c, i) => "1e" + e[i].toFixed(2));
  document.getElementById("density").appendChild(
    bars(D.density.counts, labels, 640, 150, "#3d6fd6"));
  document.getElementById("dead").textContent =
    D.density.dead + " dead latents (never fire on these rows) are not drawn.";
}

function fillSelect() {
  const sel = document.getElementById("latent-select");
  sel.textContent = "";
  for (const i of order) {
    const l = D.latents[i];
    sel.appendChild(el("option", {value: String(l.id)}, "#" + l.id + "  (" + pct(l.density) + ")"));
  }
}

function show(id) {
  if (!byId.has(id)) return;
  current = byId.get(id);
  const l = D.latents[current];
  document.getElementById("latent-input").value = String(l.id);
  document.getElementById("latent-select").value = String(l.id);
  if (location.hash !== "#latent=" + l.id) history.replaceState(null, "", "#latent=" + l.id);
  const view = document.getElementById("view");
  view.textContent = "";
  const head = el("div", {class: "card"});
  head.appendChild(el("h2", {id: "latent-heading"}, "Latent " + l.id));
  const stats = el("div", {class: "stats"});
  stats.appendChild(el("span", {}, "density " + pct(l.density)));
  stats.appendChild(el("span", {}, "max activation " + fmt(l.max)));
  stats.appendChild(el("span", {}, "fires on " + Math.round(l.density * D.n_rows) + " of "
                                    + D.n_rows + " rows"));
  head.appendChild(stats);
  view.appendChild(head);
  const grid = el("div", {class: "grid"});
  const hist = el("div", {class: "card"});
  hist.appendChild(el("h2", {}, "Activation histogram (non-zero)"));
  if (l.max > 0) {
    const labels = l.hist.map((c, i) => fmt(l.max * i / l.hist.length));
    hist.appendChild(bars(l.hist, labels, 460, 110, "#d6803d"));
  } else {
    hist.appendChild(el("p", {class: "muted"}, "This latent never fires on these rows."));
  }
  grid.appendChild(hist);
  const nn = el("div", {class: "card nn"});
  nn.appendChild(el("h2", {}, "Nearest latents (decoder cosine)"));
  for (const [j, c] of l.nn) {
    const a = el("a", {"data-latent": String(j)}, "#" + j + " " + c.toFixed(3));
    a.addEventListener("click", () => show(j));
    nn.appendChild(a);
  }
  grid.appendChild(nn);
  view.appendChild(grid);
  const ex = el("div", {class: "card", id: "examples"});
  ex.appendChild(el("h2", {}, "Top activations"));
  if (!l.ex.length) ex.appendChild(el("p", {class: "muted"}, "No activation."));
  for (const e of l.ex) {
    const line = el("div", {class: "ex"});
    line.appendChild(el("span", {class: "val"}, fmt(e.act)));
    if (e.toks) {
      const top = Math.max(1e-12, ...e.acts.map((a) => Math.abs(a || 0)));
      e.toks.forEach((t, i) => {
        const a = e.acts[i];
        const text = D.vocab[t];
        if (text.startsWith(" ")) line.appendChild(document.createTextNode(" "));
        const s = el("span", {class: "tok" + (i === e.centre ? " centre" : "")},
                     text.startsWith(" ") ? text.slice(1) : text);
        if (a) s.style.background = "rgba(255,120,20," + (0.08 + 0.8 * Math.abs(a) / top) + ")";
        s.title = a === null ? "not in the rows" : "activation " + fmt(a);
        line.appendChild(s);
      });
    } else {
      line.appendChild(el("span", {}, "row " + e.row
        + (e.seq !== undefined ? "  (sequence " + e.seq + ", position " + e.pos + ")" : "")));
    }
    ex.appendChild(line);
  }
  view.appendChild(ex);
}

function tab(name) {
  document.getElementById("summary").hidden = name !== "summary";
  document.getElementById("latents").hidden = name !== "latents";
  document.getElementById("tab-summary").className = name === "summary" ? "on" : "";
  document.getElementById("tab-latents").className = name === "latents" ? "on" : "";
}

function step(delta) {
  const at = order.indexOf(current);
  const next = order[Math.min(order.length - 1, Math.max(0, at + delta))];
  show(D.latents[next].id);
}

document.getElementById("tab-summary").addEventListener("click", () => tab("summary"));
document.getElementById("tab-latents").addEventListener("click", () => tab("latents"));
document.getElementById("latent-select").addEventListener("change",
  (ev) => show(Number(ev.target.value)));
document.getElementById("latent-input").addEventListener("change",
  (ev) => show(Number(ev.target.value)));
document.getElementById("prev").addEventListener("click", () => step(-1));
document.getElementById("next").addEventListener("click", () => step(1));
document.getElementById("order").addEventListener("change", (ev) => {
  order = D.latents.map((l, i) => i);
  if (ev.target.value === "density") {
    order.sort((a, b) => D.latents[b].density - D.latents[a].density);
  }
  fillSelect();
  show(D.latents[current].id);
});
summary();
fillSelect();
const m = /^#latent=(\\d+)$/.exec(location.hash);
if (D.latents.length) show(m && byId.has(Number(m[1])) ? Number(m[1]) : D.latents[0].id);
if (m) tab("latents");
</script>
</body>
</html>
"""
