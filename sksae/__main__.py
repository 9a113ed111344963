"""Command-line interface: ``python -m sksae COMMAND``.

Commands: ``demo`` (recovery comparison on toy data, PNG summary), ``harvest``
(run a torch model over token ids or text and store named submodules'
activations on disk), ``fit`` (train a sparse autoencoder on a .npy array or
an activation store and save it), ``transform`` (encode a .npy array or a
store with a saved model, to a .npy file or a sparse code store), ``bench``
(a quick built-in comparison of every SAE architecture and the dictionary
learners).

Exit statuses: 0 success; 2 a user error (bad option or value, missing or
unreadable file, a file that is not a .npy array, a folder that is not a
model, a parameter the estimator refuses, training that diverged), reported
as one line on stderr (``--debug`` shows the traceback); 130 interrupted
(Ctrl-C); 1 anything else, an sksae bug, shown with its traceback.

``fit``'s model folder and ``transform``'s .npy are written to a temporary
folder or file next to the target and renamed into place at the end, so an
interrupted or failed run leaves no half-written output and leaves its inputs
untouched; an output that is an input (or inside the model folder) is refused.
``fit --max-iter 0`` saves the initialized, untrained model.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import secrets
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from . import architectures

EPILOG = """\
exit statuses:
  0    success
  2    user error: bad option or value, missing or unreadable file, not a .npy
       file, not a model folder, a parameter the estimator refuses, diverged
       training (one line on stderr; --debug shows the traceback)
  130  interrupted (Ctrl-C); no partial output is left behind
  1    an internal error (a bug): shown with its traceback

fit's model folder and transform's .npy are written under a temporary name
next to the target and renamed into place at the end."""


class _Formatter(argparse.HelpFormatter):
    """Wraps one-line texts (descriptions); keeps texts laid out with newlines (epilogs)."""

    def _fill_text(self, text, width, indent):
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class UserError(Exception):
    """A mistake in the command line or its files: one line, status 2."""


# ------------------------------------------------------------- option types
def _int_type(minimum, what):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: must be {what}")
        return value
    parse.__name__ = "integer"
    return parse


positive_int = _int_type(1, "a positive integer (>= 1)")
non_negative_int = _int_type(0, "a non-negative integer (>= 0)")


def _float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number")
    return value


def non_negative_float(text):
    """A finite float >= 0 (penalty weights)."""
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= 0")
    return value


def learning_rate(text):
    """``auto`` or a finite float > 0."""
    if text == "auto":
        return text
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be 'auto' or a number > 0")
    return value


def seed(text):
    """A NumPy seed: an integer in [0, 2**32 - 1]."""
    value = non_negative_int(text)
    if value > 2**32 - 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at most 2**32 - 1")
    return value


def holdout(text):
    """Rows held out of training: a fraction in (0, 1) or a number of rows >= 1."""
    if text.strip().isdigit():
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: hold out at least one row")
        return value
    value = _float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r}: must be a fraction in (0, 1) or a whole number of rows")
    return value


def _split_holdout(X, amount):
    """``(train, held)``: the rows before the last ``amount`` and those (views, not read)."""
    import math

    n = X.shape[0]
    n_held = amount if isinstance(amount, int) else math.ceil(amount * n)
    if n_held >= n:
        raise UserError(f"--holdout {amount} leaves no rows to train on ({n} rows in all).")
    if hasattr(X, "subset"):
        return X.subset(slice(0, n - n_held)), X.subset(slice(n - n_held, n))
    return X[:n - n_held], X[n - n_held:]


def checkpoint_every(text):
    """Steps (a positive integer) or a duration such as ``90s``, ``15min``, ``2h``."""
    from ._checkpoint import parse_every

    value = int(text) if text.strip().isdigit() else text
    try:
        parse_every(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: must be a number of steps or a duration such as 90s, 15min or 2h"
        ) from None
    return value


# ------------------------------------------------------ paths and atomic writes
def _temp_sibling(target, suffix=""):
    """A fresh hidden name next to ``target`` (same folder, same file system)."""
    target = Path(target)
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{suffix}")


def _remove(path):
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except OSError:
        pass


def _inside(path, folder):
    """Whether the real ``path`` is ``folder`` or lies under it."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _same_file(a, b):
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_output_parent(output):
    parent = Path(output).parent
    if not parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, "output folder does not exist", str(parent))


@contextmanager
def _atomic_file(output):
    """A temporary file path next to ``output``; renamed to it if the block succeeds."""
    output = Path(output)
    if output.is_dir():
        raise IsADirectoryError(errno.EISDIR, "output is a folder", str(output))
    _check_output_parent(output)
    tmp = _temp_sibling(output, output.suffix)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # umask applies
    try:
        yield tmp
        os.replace(tmp, output)
    except BaseException:
        _remove(tmp)
        raise


def _is_replaceable_model_folder(folder):
    """Empty, or an sksae model folder (its config.json says format "sksae")."""
    from ._io import _MAX_CONFIG_BYTES, CONFIG_FILE, FORMAT, read_json_bounded

    if not any(folder.iterdir()):
        return True
    try:  # bounded: a planted config cannot exhaust memory or the recursion limit
        config = read_json_bounded(folder / CONFIG_FILE, _MAX_CONFIG_BYTES)
    except ValueError:
        return False
    return isinstance(config, dict) and config.get("format") == FORMAT


@contextmanager
def _atomic_folder(output):
    """A temporary folder next to ``output``; it replaces ``output`` if the block succeeds.

    An existing ``output`` must be an empty folder or an sksae model folder; it is
    renamed aside, the new folder renamed in, and only then removed.
    """
    output = Path(output)
    if output.exists() or output.is_symlink():
        if not output.is_dir():
            raise FileExistsError(errno.EEXIST, "output exists and is not a folder",
                                  str(output))
        if not _is_replaceable_model_folder(output):
            raise UserError(f"{output} exists and is not an sksae model folder; "
                            "remove it or choose another --output.")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(output)
    os.mkdir(tmp)
    try:
        yield tmp
        from ._base import deferred_interrupts

        with deferred_interrupts():  # a Ctrl-C lands before the swap or after it
            if output.exists():
                old = _temp_sibling(output, ".old")
                os.replace(output, old)
                try:
                    os.replace(tmp, output)
                except BaseException:
                    os.replace(old, output)
                    raise
            else:
                old = None
                os.replace(tmp, output)
        if old is not None:
            _remove(old)
    except BaseException:
        _remove(tmp)
        raise


# ------------------------------------------------------------------ commands
def _demo(args):
    from ._demo import run_demo

    figure = None
    if not args.no_figure:
        try:
            import matplotlib  # noqa: F401

            figure = args.figure
        except ImportError:
            print("(matplotlib is not installed: no summary figure)")
    # the figure is written directly: run_demo prints the path it writes to, and it
    # saves the figure in one call at the end (a temporary name would show there)
    run_demo(n_samples=args.n_samples, device=args.device, random_state=args.random_state,
             verbose=args.verbose, figure=figure)
    return 0


def _load_rows(path, layer=None):
    """A .npy file memory-mapped (no pickle), as a 2-D array, or an activation store."""
    import numpy as np

    if Path(path).is_dir():
        from .activations import open_store
        from .activations._store import MANIFEST

        if not (Path(path) / MANIFEST).is_file():
            raise UserError(f"{path} is a folder but not an activation store (no {MANIFEST}).")
        return open_store(path, layer)
    if layer is not None:
        raise UserError(f"--layer applies to an activation store; {path} is a file.")
    if not str(path).endswith(".npy"):
        raise UserError(f"{path} is not a .npy file (save arrays with numpy.save) nor an "
                        "activation store folder.")
    try:
        X = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError) as exc:
        raise UserError(f"{path} is not a readable .npy array: {exc}") from exc
    if X.ndim == 0 or X.size == 0:
        raise UserError(f"{path} holds an array of shape {X.shape}: no rows to use.")
    if X.ndim != 2:
        X = X.reshape(-1, X.shape[-1])  # e.g. (batch, tokens, d_model) activations
    return X


def _load_model(folder):
    """An sksae folder, or a SAELens or sparsify SAE folder."""
    from . import interop
    from ._io import CONFIG_FILE, load

    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(errno.ENOENT, "No such model folder", str(folder))
    if not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "model is not a folder", str(folder))
    if (folder / CONFIG_FILE).is_file():
        return load(folder)
    if (folder / interop.SAELENS_WEIGHTS).is_file():
        return interop.from_saelens(folder)
    if (folder / interop.SPARSIFY_WEIGHTS).is_file():
        return interop.from_sparsify(folder)
    raise UserError(f"{folder} is not an sksae, SAELens or sparsify model folder.")


def _architecture_params(text):
    """``--architecture-params``: a JSON object, or None."""
    from ._io import _loads_bounded

    if text is None:
        return None
    try:
        value = _loads_bounded(text)  # JSONDecodeError and too deep a nesting: ValueError
    except ValueError as exc:
        raise UserError(f"--architecture-params is not valid JSON ({exc}).") from None
    if not isinstance(value, dict):
        raise UserError("--architecture-params must be a JSON object, "
                        "e.g. '{\"prefix_sizes\": [64, 256]}'.")
    return value


def _last(history, key):
    values = history.get("epoch", {}).get(key, ())
    return float(values[-1]) if len(values) else None


def _fit(args):
    from .distributed import init_from_environment, is_main_process

    if _inside(args.acts, args.output):
        raise UserError(f"--output {args.output} is (or contains) the input {args.acts}; "
                        "choose another folder.")
    if args.checkpoint_dir is not None and (_inside(args.checkpoint_dir, args.output)
                                            or _inside(args.output, args.checkpoint_dir)):
        raise UserError(f"--checkpoint-dir {args.checkpoint_dir} and --output {args.output} "
                        "overlap (the model folder is replaced at the end); choose "
                        "separate folders.")
    X = _load_rows(args.acts, args.layer)
    held = None
    if args.holdout is not None:
        X, held = _split_holdout(X, args.holdout)
    # under torchrun: data-parallel, every rank trains, rank 0 alone prints and writes
    launched = init_from_environment()
    ending = _ending_group() if launched else None
    try:
        return _fit_rows(args, X, launched, is_main_process(), held)
    finally:
        if launched:
            _leave_group(ending)


#: how long the other ranks wait at the end for rank 0's saving and held-out evaluation
_ENDING_TIMEOUT_S = 7 * 24 * 3600


def _ending_group():
    """A gloo group for the final wait, made by every rank before training.

    The default group's timeout (10 minutes) bounds a collective waiting for a
    rank that is gone; rank 0's writing of the model and its ``--holdout``
    evaluation of a large store may take longer than that, and the waiting
    ranks must not fail then (torchrun would stop rank 0 with them).
    """
    import datetime

    import torch.distributed as dist

    return dist.new_group(backend="gloo",
                          timeout=datetime.timedelta(seconds=_ENDING_TIMEOUT_S))


def _leave_group(ending=None):
    """Wait for rank 0's writing, then close the process group (its threads end cleanly)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier(group=ending)
        dist.destroy_process_group()


def _fit_rows(args, X, launched, main, held=None):
    import time

    from ._io import save
    from ._sae import SparseAutoencoder

    # penalty weights left unset keep the estimator's defaults
    penalties = {k: v for k, v in (("alpha", args.alpha), ("l0_coefficient",
                                                           args.l0_coefficient))
                 if v is not None}
    sae = SparseAutoencoder(
        n_components=args.n_components, architecture=args.architecture, k=args.k,
        architecture_params=_architecture_params(args.architecture_params),
        learning_rate=args.learning_rate, batch_size=args.batch_size,
        shuffle=False if args.shuffle == "none" else args.shuffle,
        shuffle_buffer=args.shuffle_buffer, max_iter=args.max_iter, device=args.device, precision=args.precision,
        random_state=args.random_state, verbose=0 if args.quiet or not main else 1,
        checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
        **penalties)
    if not main:
        sae.fit(X)
        return 0
    with _atomic_folder(args.output) as tmp:
        how = "read batch by batch" if Path(args.acts).is_dir() else "memory-mapped"
        ranks = ""
        if launched:
            import torch.distributed as dist

            ranks = f", data-parallel on {dist.get_world_size()} processes"
        print(f"Fitting {sae.architecture} SAE on {X.shape[0]} rows x {X.shape[1]} "
              f"features ({args.acts}, {how}{ranks})")
        start = time.perf_counter()
        sae.fit(X)
        seconds = time.perf_counter() - start
        fve, l0 = _last(sae.history_, "fve"), _last(sae.history_, "l0")
        if l0 is None:  # --max-iter 0 (or an estimator that records no epoch)
            last = "no epoch trained: the saved model is its initialization"
        else:
            last = (f"last epoch: FVE {float('nan') if fve is None else fve:.3f}, "
                    f"L0 {l0:.1f}")
        print(f"{sae.n_components_} atoms, {sae.n_steps_} steps in {seconds:.1f} s; {last}")
        if held is not None:
            from .metrics import evaluate

            m = evaluate(sae, held)
            print(f"held out (the last {held.shape[0]} rows): FVE "
                  f"{m.explained_variance:.4f}, L0 {m.l0:.1f}, MSE {m.mse:.4g}, "
                  f"alive {m.frac_alive:.3f}")
        save(sae, tmp)
    print(f"Saved to {args.output}")
    return 0


def _transform(args):
    import numpy as np

    if _same_file(args.output, args.acts):
        raise UserError(f"--output {args.output} is the input {args.acts}; "
                        "write the codes to another file.")
    if _inside(args.output, args.model):
        raise UserError(f"--output {args.output} is inside the model folder {args.model}; "
                        "write the codes elsewhere.")
    model = _load_model(args.model)
    X = _load_rows(args.acts, args.layer)
    if not str(args.output).endswith(".npy"):
        from .activations import transform_to_store

        if Path(args.output).exists() and not (Path(args.output) / "manifest.json").is_file():
            raise UserError(f"--output {args.output} exists and is not a code store; "
                            "choose another path.")
        codes = transform_to_store(model, X, args.output, chunk_rows=args.chunk_rows,
                                   overwrite=True)
        print(f"Wrote sparse codes of shape {codes.shape} ({codes.nnz} non-zeros) to the "
              f"code store {args.output}")
        return 0
    n_out = model.transform(np.asarray(X[:1])).shape[1]
    dtype = np.dtype(args.dtype)
    shape = (X.shape[0], n_out)
    with _atomic_file(args.output) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        try:
            for start in range(0, X.shape[0], args.chunk_rows):
                stop = min(start + args.chunk_rows, X.shape[0])
                out[start:stop] = model.transform(np.asarray(X[start:stop]))
            out.flush()
        finally:
            del out  # unmap before the rename (or the removal)
    print(f"Wrote codes of shape {shape} ({dtype}) to {args.output}")
    return 0
def _import_model(spec):
    """``package.module:name`` or ``path/to/file.py:name``: a module, or a callable making one."""
    import importlib
    import importlib.util

    import torch

    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise UserError(f"MODEL {spec!r} must be 'package.module:name' or "
                        "'path/to/file.py:name'.")
    if where.endswith(".py"):
        if not Path(where).is_file():
            raise FileNotFoundError(errno.ENOENT, "No such model file", where)
        module_spec = importlib.util.spec_from_file_location("_sksae_user_model", where)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise UserError(f"cannot import {where!r} ({exc}).") from None
    if not hasattr(module, name):
        raise UserError(f"{where} has no {name!r}.")
    model = getattr(module, name)
    if not isinstance(model, torch.nn.Module) and callable(model):
        model = model()
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"{spec} is a {type(model).__name__}, not a torch.nn.Module or a "
                        "function returning one.")
    return model


def _token_batches(args):
    """Batches of the token ids in ``args.tokens`` (a 2-D integer .npy), and their mask."""
    import numpy as np
    import torch

    ids = _load_ids(args.tokens)
    batches = [torch.from_numpy(np.array(ids[i:i + args.batch_size], dtype=np.int64))
               for i in range(0, len(ids), args.batch_size)]

    def mask(batch):
        keep = torch.ones(batch.shape, dtype=torch.bool)
        if args.pad_id is not None:
            keep &= batch != args.pad_id
        if args.skip_first:
            keep[:, 0] = False
        return keep

    return batches, mask, {"tokens": str(args.tokens)}


def _load_ids(path):
    import numpy as np

    if not str(path).endswith(".npy"):
        raise UserError(f"--tokens {path} is not a .npy file.")
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError) as exc:
        raise UserError(f"{path} is not a readable .npy array: {exc}") from exc
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.size == 0:
        raise UserError(f"--tokens {path} must hold a 2-D array of integer token ids "
                        f"(sequences x positions); it holds {ids.shape} {ids.dtype}.")
    return ids


def _text_batches(args):
    """Tokenized batches of the lines of ``args.text`` (transformers' tokenizer)."""
    import torch

    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UserError("--text needs the transformers package (pip install transformers); "
                        "or pass --tokens with token ids.") from None
    if args.tokenizer is None:
        raise UserError("--text needs --tokenizer (a local tokenizer folder).")
    with open(args.text, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise UserError(f"--text {args.text} has no non-empty line.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the tokenizer {args.tokenizer!r} offline ({exc}).") \
            from None
    batches = [dict(tokenizer(lines[i:i + args.batch_size], padding=True, truncation=True,
                              max_length=args.seq_len, return_tensors="pt"))
               for i in range(0, len(lines), args.batch_size)]

    def mask(batch):
        keep = batch["attention_mask"].bool()
        if args.skip_first:
            keep = keep & (torch.arange(keep.shape[1]) > 0)
        return keep

    return batches, mask, {"text": str(args.text), "tokenizer": str(args.tokenizer),
                           "seq_len": args.seq_len}


def _harvest(args):
    from .activations import harvest

    if (args.tokens is None) == (args.text is None):
        raise UserError("give exactly one of --tokens (a .npy of token ids) and --text "
                        "(a text file, one input per line).")
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise UserError(f"--output {args.output} exists and is not a folder.")
    model = _import_model(args.model)
    batches, mask, source = _token_batches(args) if args.tokens else _text_batches(args)
    stores = harvest(model, batches, args.layer if len(args.layer) > 1 else args.layer[0],
                     args.output, mask=mask, dtype=args.dtype, shard_rows=args.shard_rows,
                     max_rows=args.max_rows, device=None if args.device == "auto" else
                     args.device, source=source, overwrite=args.overwrite,
                     progress=not args.quiet)
    stores = stores if isinstance(stores, dict) else {args.layer[0]: stores}
    for name, store in stores.items():
        print(f"{name}: {store.shape[0]} rows x {store.shape[1]} features "
              f"({store.storage_dtype}, {store.n_shards} shards)")
    print(f"Wrote the activation store {args.output}")
    return 0


def _report(args):
    from .report import feature_browser

    if args.tokens is not None and args.text is not None:
        raise UserError("give at most one of --tokens (a .npy of token ids) and --text.")
    if _inside(args.output, args.model) or _same_file(args.output, args.acts):
        raise UserError(f"--output {args.output} is an input or inside the model folder; "
                        "write the report elsewhere.")
    model = _load_model(args.model)
    X = _load_rows(args.acts, args.layer)
    tokens = tokenizer = None
    if args.tokens is not None:
        tokens = _load_ids(args.tokens)
    elif args.text is not None:
        batches, _, _ = _text_batches(args)  # tokenized as harvest --text does
        tokens = [ids for b in batches for ids in b["input_ids"].tolist()]
    if tokens is not None and not hasattr(X, "positions"):
        raise UserError("--tokens and --text need ACTS to be an activation store written by "
                        "harvest (its rows' positions map them to tokens).")
    if args.tokenizer is not None:
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
        except ImportError:
            raise UserError("--tokenizer needs the transformers package "
                            "(pip install transformers).") from None
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load the tokenizer {args.tokenizer!r} offline "
                            f"({exc}).") from None
    with _atomic_file(args.output) as tmp:
        feature_browser(model, X, tmp, tokens=tokens, tokenizer=tokenizer, n_top=args.n_top,
                        context=args.context, title=args.title)
    print(f"Wrote the feature browser of {X.shape[0]} rows to {args.output}")
    return 0


def run_bench(n_samples=4000, n_features=16, device="auto", random_state=0):
    """The ``bench`` command: every estimator on one toy problem, one table.

    Returns
    -------
    rows : list of dict
    """
    import time

    from sklearn.decomposition import MiniBatchDictionaryLearning

    from ._demo import evaluate_recovery, format_table
    from ._dict_learning import DictionaryLearnerGPU
    from ._sae import SparseAutoencoder
    from .datasets import make_sparse_superposition

    n_true, n_components = 2 * n_features, 4 * n_features
    n_test = max(n_samples // 5, 1)
    X, features = make_sparse_superposition(
        n_samples + n_test, n_features, n_true, random_state=random_state,
        return_features=True)
    X = X.astype("float32")
    X_train, X_test = X[:n_samples], X[n_samples:]
    print(f"Toy data: {n_samples} rows, {n_features} dims, {n_true} true features; "
          f"{n_components} atoms.\n")
    common = dict(n_components=n_components, device=device, random_state=random_state)
    sae = dict(common, max_iter=3, batch_size=256, k=5, alpha=0.5, l0_coefficient=0.5)
    models = [(f"SAE {name}", SparseAutoencoder(architecture=name, **sae))
              for name in architectures.available()]
    models += [
        ("DictionaryLearnerGPU", DictionaryLearnerGPU(
            alpha=0.1, max_iter=1, batch_size=256, transform_algorithm="lasso_lars",
            transform_alpha=0.1, **common)),
        ("sklearn MiniBatchDictionaryLearning", MiniBatchDictionaryLearning(
            n_components=n_components, alpha=0.1, max_iter=1, batch_size=256,
            transform_algorithm="lasso_lars", transform_alpha=0.1,
            random_state=random_state)),
    ]
    rows = []
    for name, model in models:
        start = time.perf_counter()
        model.fit(X_train)
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        model.transform(X_test)
        rate = len(X_test) / max(time.perf_counter() - start, 1e-9)
        row = evaluate_recovery(name, model, X_test, features, seconds)
        row["transform rows/s"] = f"{rate:,.0f}"
        rows.append(row)
        print(f"  {name}: {seconds:.1f} s", flush=True)
    print()
    print(format_table(rows))
    return rows


def _bench(args):
    run_bench(n_samples=args.n_samples, n_features=args.n_features, device=args.device,
              random_state=args.random_state)
    return 0


def build_parser():
    """The argument parser of ``python -m sksae``."""
    formatter = _Formatter
    parser = argparse.ArgumentParser(prog="python -m sksae",
                                     description=__doc__.split("\n\n")[0] + "\n\n"
                                     + __doc__.split("\n\n")[1],
                                     epilog=EPILOG, formatter_class=formatter)
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a user error")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, **kwargs):
        p = sub.add_parser(name, epilog=EPILOG, formatter_class=formatter, **kwargs)
        # also accepted after the command; SUPPRESS keeps the top-level value otherwise
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of a user error")
        return p

    demo = command("demo", help="fit an SAE and scikit-learn's dictionary learning "
                                "on toy superposition data and compare them")
    demo.add_argument("--n-samples", type=positive_int, default=20_000)
    demo.add_argument("--device", default="auto")
    demo.add_argument("--random-state", type=seed, default=0)
    demo.add_argument("--figure", default="sksae_demo.png",
                      help="path of the PNG summary figure (default: %(default)s)")
    demo.add_argument("--no-figure", action="store_true", help="do not write the figure")
    demo.add_argument("-v", "--verbose", action="count", default=0)
    demo.set_defaults(func=_demo)

    fit = command(
        "fit", help="train a sparse autoencoder on activations in a .npy file and save it",
        description="Train a SparseAutoencoder on ACTS (a .npy array of shape (n_rows, "
                    "n_features), memory-mapped, higher-dimensional arrays flattened to "
                    "rows; or an activation store folder, read batch by batch with a "
                    "block shuffle) and save it with sksae.save. The folder is written "
                    "under a temporary name and renamed at the end; an existing OUTPUT "
                    "is replaced only if it is empty or an sksae model folder.")
    fit.add_argument("acts", help="input .npy file or activation store folder")
    fit.add_argument("--layer", default=None,
                     help="the layer of a store that holds several (see harvest)")
    fit.add_argument("-o", "--output", required=True, help="model folder to write")
    fit.add_argument("--architecture", default="topk", choices=architectures.available(),
                     help="a registered architecture (default: %(default)s)")
    fit.add_argument("--architecture-params", default=None, metavar="JSON",
                     help="hyperparameters of the architecture that are not options here, "
                          "as a JSON object (e.g. '{\"prefix_sizes\": [64, 256]}')")
    fit.add_argument("--n-components", type=positive_int, default=None,
                     help="dictionary size (default: 8 x n_features)")
    fit.add_argument("--k", type=positive_int, default=32,
                     help="active latents (the TopK family: topk, batchtopk, matryoshka)")
    fit.add_argument("--alpha", type=non_negative_float, default=None,
                     help="L1 weight (relu, gated; default: the estimator's)")
    fit.add_argument("--l0-coefficient", type=non_negative_float, default=None,
                     help="L0 weight (jumprelu; default: the estimator's)")
    fit.add_argument("--learning-rate", type=learning_rate, default="auto",
                     help="'auto' or a number > 0 (default: %(default)s)")
    fit.add_argument("--batch-size", type=positive_int, default=1024)
    fit.add_argument("--shuffle", default="auto", choices=["auto", "rows", "blocks", "none"],
                     help="row order of each epoch: 'auto' is blocks for a store, rows for a "
                          ".npy (see SparseAutoencoder's shuffle)")
    fit.add_argument("--shuffle-buffer", type=positive_int, default=None,
                     help="rows per read of a store (the block shuffle's buffer; default "
                          "about 128 MiB)")
    fit.add_argument("--max-iter", type=non_negative_int, default=30,
                     help="epochs; 0 saves the initialized, untrained model "
                          "(default: %(default)s)")
    fit.add_argument("--device", default="auto")
    fit.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"],
                     help="precision of the training step's products (see SparseAutoencoder)")
    fit.add_argument("--random-state", type=seed, default=None)
    fit.add_argument("--checkpoint-dir", default=None,
                     help="folder of the training checkpoints; a fit of the same data "
                          "and options resumes from its unfinished checkpoint")
    fit.add_argument("--checkpoint-every", type=checkpoint_every, default=None,
                     help="steps between checkpoints, or a duration such as 90s, 15min "
                          "or 2h (default: 1000 steps)")
    fit.add_argument("--holdout", type=holdout, default=None, metavar="FRACTION|ROWS",
                     help="train on all rows but the last ones (a fraction, e.g. 0.01, or "
                          "a number of rows) and print the core metrics on those (FVE, "
                          "L0, MSE, alive fraction); a harvested store's last rows come "
                          "from its last sequences")
    fit.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    fit.set_defaults(func=_fit)

    tr = command(
        "transform", help="encode a .npy file with a saved model",
        description="Encode ACTS with the model in MODEL_DIR (an sksae.save folder, or a "
                    "SAELens or sparsify SAE folder) and write the codes to a .npy file "
                    "(dense) or a code store folder (sparse), chunk by chunk, under a "
                    "temporary name renamed at the end. OUTPUT "
                    "may not be ACTS nor lie inside MODEL_DIR.")
    tr.add_argument("model", help="model folder")
    tr.add_argument("acts", help="input .npy file or activation store folder")
    tr.add_argument("-o", "--output", required=True,
                    help="output .npy file (dense codes), or a folder for a sparse code "
                         "store (sksae.activations.open_codes)")
    tr.add_argument("--layer", default=None,
                    help="the layer of a store that holds several")
    tr.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    tr.add_argument("--chunk-rows", type=positive_int, default=65536)
    tr.set_defaults(func=_transform)

    hv = command(
        "harvest", help="store a torch model's activations over token ids or text",
        description="Run MODEL over input batches and write the outputs of the --layer "
                    "submodules (names from model.named_modules()) to an activation store "
                    "folder (sksae.activations.open_store): sharded .npy files with a "
                    "SHA-256 digest per 1 MiB block, a line per shard and a small manifest. "
                    "Inputs: --tokens, a .npy of integer "
                    "token ids (sequences x positions), or --text, a text file with one "
                    "input per line and --tokenizer, a local tokenizer folder "
                    "(transformers). An interrupted harvest resumes where it stopped when "
                    "run again with the same arguments.")
    hv.add_argument("model", help="'package.module:name' or 'path/to/file.py:name': a "
                                  "torch.nn.Module or a function returning one")
    hv.add_argument("--layer", action="append", required=True,
                    help="a submodule whose output to store (repeat for several)")
    hv.add_argument("-o", "--output", required=True, help="store folder to write")
    hv.add_argument("--tokens", default=None, help=".npy of token ids")
    hv.add_argument("--text", default=None, help="text file, one input per line")
    hv.add_argument("--tokenizer", default=None, help="local tokenizer folder (with --text)")
    hv.add_argument("--seq-len", type=positive_int, default=128,
                    help="truncate texts to this many tokens (default: %(default)s)")
    hv.add_argument("--pad-id", type=int, default=None,
                    help="token id of padding in --tokens: those positions are dropped")
    hv.add_argument("--skip-first", action="store_true",
                    help="drop the first position of every sequence (BOS/CLS)")
    hv.add_argument("--batch-size", type=positive_int, default=32,
                    help="sequences per forward pass (default: %(default)s)")
    hv.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    hv.add_argument("--shard-rows", type=positive_int, default=65536)
    hv.add_argument("--max-rows", type=positive_int, default=None)
    hv.add_argument("--device", default="auto",
                    help="where the inputs go (default: the model's device)")
    hv.add_argument("--overwrite", action="store_true", help="replace an existing store")
    hv.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    hv.set_defaults(func=_harvest)

    rp = command(
        "report", help="write a feature browser (one offline HTML file) of a saved model",
        description="Encode ACTS (a .npy array or an activation store) with the model in "
                    "MODEL_DIR and write one self-contained HTML file (no network needed): "
                    "the core metrics, the latent density histogram, and per latent its "
                    "density, activation histogram, nearest latents by decoder cosine and "
                    "top-activating rows, shown as tokens in context with --tokens or "
                    "--text (the inputs that were harvested into the store, in order).")
    rp.add_argument("model", help="model folder")
    rp.add_argument("acts", help="input .npy file or activation store folder")
    rp.add_argument("-o", "--output", required=True, help="HTML file to write")
    rp.add_argument("--layer", default=None, help="the layer of a store that holds several")
    rp.add_argument("--tokens", default=None, help=".npy of the harvested token ids")
    rp.add_argument("--text", default=None,
                    help="the harvested text file, one input per line (with --tokenizer)")
    rp.add_argument("--tokenizer", default=None,
                    help="local tokenizer folder: shows tokens as text (transformers)")
    rp.add_argument("--seq-len", type=positive_int, default=128,
                    help="the harvest's --seq-len, with --text (default: %(default)s)")
    rp.add_argument("--n-top", type=positive_int, default=10,
                    help="top-activating rows per latent (default: %(default)s)")
    rp.add_argument("--context", type=non_negative_int, default=6,
                    help="tokens shown on each side (default: %(default)s)")
    rp.add_argument("--title", default=None, help="the page's title")
    rp.set_defaults(func=_report, batch_size=32, skip_first=False)

    bench = command(
        "bench", help="quick comparison of every SAE architecture and dictionary learner",
        description="Fit every SparseAutoencoder architecture, DictionaryLearnerGPU and "
                    "scikit-learn's MiniBatchDictionaryLearning on toy superposition data "
                    "and print fit time, transform throughput, held-out FVE, L0 and "
                    "recovery of the true features. Built in and small (well under a "
                    "minute on a CPU); the full benchmarks are the scripts in benchmarks/ "
                    "of the source repository.")
    bench.add_argument("--n-samples", type=positive_int, default=4000)
    bench.add_argument("--n-features", type=positive_int, default=16)
    bench.add_argument("--device", default="auto")
    bench.add_argument("--random-state", type=seed, default=0)
    bench.set_defaults(func=_bench)
    return parser


_USER_OS_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError,
                   NotADirectoryError, PermissionError)
_USER_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.ENAMETOOLONG, getattr(errno, "EDQUOT", -1)}


def _user_message(exc):
    """The one-line message of a user error, or None if ``exc`` is not one."""
    if isinstance(exc, UserError):
        text = str(exc)
    elif isinstance(exc, OSError) and (isinstance(exc, _USER_OS_ERRORS)
                                      or exc.errno in _USER_ERRNOS):
        text = (f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename
                else str(exc) or type(exc).__name__)
    elif isinstance(exc, FloatingPointError):  # training diverged
        text = (f"{exc} (training diverged: try a smaller --learning-rate, "
                "--precision float32, or check the input for huge values)")
    elif isinstance(exc, (ValueError, TypeError)):
        text = str(exc) or type(exc).__name__
    else:
        return None
    return " ".join(text.split())  # one line


def main(argv=None):
    """Entry point of ``python -m sksae`` and of the ``sksae`` script.

    Returns the exit status (0, 2 for a user error, 130 if interrupted); argparse
    errors raise SystemExit(2); an internal error propagates (a traceback, status 1).
    """
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        message = _user_message(exc)
        if message is None or args.debug:
            raise
        sys.stdout.flush()
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
