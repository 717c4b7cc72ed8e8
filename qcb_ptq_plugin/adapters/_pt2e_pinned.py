"""Pinned twins of torchao's PT2E observers, defined when this module is imported.

A pinned observer keeps its calibrated min/max whatever it sees later, so ``convert_pt2e``
reproduces the purified integers even if the prepared model runs again. Each class is a
module-level name here (``PinnedPerChannelMinMaxObserver`` ...), so a pickled prepared model
unpickles in a fresh process: pickle imports this module and finds the class. The module
imports torchao, so :mod:`.pt2e` imports it only when it pins (torchao is loaded by then);
``import qcb_ptq_plugin`` stays torchao-free.
"""

from __future__ import annotations

import inspect

from torchao.quantization.pt2e import observer as _torchao_observer

__all__ = ["pinned_class"]


def _ignore_new_data(self, x):
    return x


def _define() -> dict[type, type]:
    twins = {}
    for name, cls in vars(_torchao_observer).items():
        if (inspect.isclass(cls) and issubclass(cls, _torchao_observer.ObserverBase) and not inspect.isabstract(cls)
                and cls.__module__ == _torchao_observer.__name__):
            pinned = type(f"Pinned{name}", (cls,), {"forward": _ignore_new_data, "__module__": __name__,
                                                     "__qualname__": f"Pinned{name}",
                                                     "__doc__": f"{name} that ignores data after calibration."})
            globals()[pinned.__name__] = pinned
            twins[cls] = pinned
    return twins


_TWINS = _define()


def pinned_class(cls: type) -> type | None:
    """The pinned twin of a torchao observer class, or None for observers torchao does not define."""
    return _TWINS.get(cls)
