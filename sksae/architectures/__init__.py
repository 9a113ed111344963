"""SAE architectures behind one registry.

Each module holds one architecture: a subclass of :class:`Architecture` that
declares its hyperparameters, forward, losses, schedules, fitted arrays and
peer mappings. :func:`register` adds one defined anywhere (a decorator);
architectures of other installed packages are found through the
``sksae.architectures`` entry-point group. The estimator's ``architecture``
parameter, :func:`sksae.save` / :func:`sksae.load`, :mod:`sksae.interop` and
the CLI all read this registry.
"""

from __future__ import annotations

from collections.abc import Set

from ._base import (Architecture, EncodeOutput, LossInputs, PenaltyWarmup, Schedule,
                    SparseCodes, decode)
from .batchtopk import BatchTopK
from .gated import Gated
from .jumprelu import JumpReLU
from .matryoshka import MatryoshkaBatchTopK
from .relu import ReLU
from .topk import TopK, TopKFamily

__all__ = ["Architecture", "PenaltyWarmup", "TopKFamily", "EncodeOutput", "LossInputs",
           "Schedule", "SparseCodes", "decode", "register", "get", "available", "ReLU",
           "TopK", "BatchTopK", "MatryoshkaBatchTopK", "JumpReLU", "Gated"]

REGISTRY = {cls.name: cls for cls in (ReLU, TopK, BatchTopK, JumpReLU, Gated,
                                      MatryoshkaBatchTopK)}
_ENTRY_POINT_GROUP = "sksae.architectures"
_entry_points_loaded = False


def register(cls):
    """Add an :class:`Architecture` subclass to the registry (usable as a decorator).

    Parameters
    ----------
    cls : type
        A subclass of :class:`Architecture` with a string ``name``.

    Returns
    -------
    cls : type
        The class itself.
    """
    if not (isinstance(cls, type) and issubclass(cls, Architecture)):
        raise TypeError(f"register expects an Architecture subclass, got {cls!r}.")
    if not isinstance(cls.name, str) or not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty string `name` to be registered.")
    REGISTRY[cls.name] = cls
    return cls


def _load_entry_points():
    """Register the architectures that installed packages declare (once)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=_ENTRY_POINT_GROUP):
        register(ep.load())


def available():
    """Names of the registered architectures, sorted."""
    _load_entry_points()
    return sorted(REGISTRY)


def get(name):
    """The architecture class registered under ``name``.

    Raises
    ------
    ValueError
        When no architecture has that name.
    """
    if name not in REGISTRY:
        _load_entry_points()
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"Unknown architecture {name!r}; expected one of {available()}."
        ) from None


class _RegisteredNames(Set):
    """A live view of the registry's names (for parameter constraints made at import)."""

    def __contains__(self, name):
        if name not in REGISTRY:
            _load_entry_points()
        return name in REGISTRY

    def __iter__(self):
        return iter(available())

    def __len__(self):
        return len(available())

    @classmethod
    def _from_iterable(cls, it):  # set operations on the view give plain sets
        return set(it)


#: the registered names, always current (``StrOptions(NAMES)`` validates against it)
NAMES = _RegisteredNames()
