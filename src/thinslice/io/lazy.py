"""Optional heavy imports (SimpleITK, pydicom) deferred to first use.

``import thinslice`` (and training or inference on arrays already in memory) then works without them, e.g. on a GPU
machine that has PyTorch but not SimpleITK, and the command line starts faster. A missing package is reported when a
file is actually read or written, in one line that says what to install.

The stand-in is kept out of ``sys.modules`` (unlike ``importlib.util.LazyLoader``'s), because importing torch
touches every module registered there and would load the real package at once.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from thinslice.errors import ThinsliceError


class _Deferred(ModuleType):
    """Imports the package named ``name`` at the first attribute access and forwards to it."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._loaded: ModuleType | None = None

    def __getattr__(self, attr: str) -> object:
        if attr.startswith("__"):
            raise AttributeError(attr)
        if self._loaded is None:
            try:
                self._loaded = importlib.import_module(self.__name__)
            except ImportError as err:
                raise ThinsliceError(f"{self.__name__} is needed to read or write volume files but cannot be "
                                     f"imported ({err}); pip install {self.__name__}") from None
        return getattr(self._loaded, attr)


def lazy_import(name: str) -> ModuleType:
    """``name`` as a module object that imports the real package when first used."""
    return _Deferred(name)
