"""Register binq with transformers when transformers' quantizer registry is imported, not before.

``import binq`` must make ``AutoModelForCausalLM.from_pretrained`` understand binq checkpoints, but
importing transformers' quantizer registry eagerly costs seconds. So: if that registry is already
imported, register now; otherwise a one-shot import hook registers right after it is first imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from types import ModuleType

_REGISTRY_MODULE = "transformers.quantizers.auto"


def _register() -> None:
    integration = sys.modules.get("binq.integration.transformers")
    if integration is not None and not hasattr(integration, "register"):
        return  # that module is importing the registry right now; it registers itself when done
    from binq.integration.transformers import register

    register()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object = None, target: object = None) -> object:
        if fullname != _REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)  # one shot; the ordinary finders locate the module
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: ModuleType) -> None:
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Register now if transformers' registry is loaded, else once it is."""
    if _REGISTRY_MODULE in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
