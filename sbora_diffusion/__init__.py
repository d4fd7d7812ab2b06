"""The diffusion world: Stable Diffusion concepts (training, generation, composition, scoring,
export, the app) and the embedded pocket world, built on the core package ``sbora``
(docs/architecture.md §1).

The domain-neutral modules that used to live here moved to the core, and two concept modules
into ``concept/``; their old import paths keep working (with a DeprecationWarning that names the
new one): ``sbora_diffusion.adapters…`` is ``sbora.adapters…``, likewise ``procedures``,
``engine``, ``configuration``, ``cli``, ``checkpoint``, ``rundir``, ``fileio``, ``hub``;
``sbora_diffusion.concepts`` is ``sbora_diffusion.concept.config`` and
``sbora_diffusion.concept_adapter`` is ``sbora_diffusion.concept.adapter``.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

import sbora  # noqa: F401  (first: it quiets a bitsandbytes warning that diffusers' imports would print)

MOVED = {**{f"{__name__}.{m}": f"sbora.{m}" for m in ("adapters", "procedures", "engine", "configuration", "cli", "checkpoint", "rundir",
                                                       "fileio", "hub")},
         f"{__name__}.concepts": f"{__name__}.concept.config", f"{__name__}.concept_adapter": f"{__name__}.concept.adapter"}


def moved_to(name: str) -> str | None:
    """The module's new name, for an old import path (``sbora_diffusion.adapters.inject`` -> ``sbora.adapters.inject``)."""
    for old, new in MOVED.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old):]
    return None


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Old import paths of moved modules: a stand-in module that reads every name from the new one."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self, is_package=True) if moved_to(name) else None

    def create_module(self, spec):
        return None  # the default: a new, empty module of the old name

    def exec_module(self, module):
        new = moved_to(module.__name__)
        warnings.warn(f"{module.__name__} moved to {new}; import it from there", DeprecationWarning, stacklevel=2)
        real = importlib.import_module(new)
        module.__getattr__ = lambda attr: getattr(real, attr)  # PEP 562: the same functions and classes, read live
        module.__doc__ = real.__doc__


sys.meta_path.append(_MovedModules())
