"""Adapters of the Probe to training frameworks, each imported only when used.

* :mod:`gradprobe.integrations.huggingface`: ``GradprobeCallback`` for ``transformers.Trainer``
  (``pip install gradprobe[huggingface]``).
* :mod:`gradprobe.integrations.lightning`: ``GradprobeCallback`` for a Lightning 2.x ``Trainer``
  (``pip install gradprobe[lightning]``).
* :mod:`gradprobe.integrations.keras`: ``GradprobeCallback`` for Keras 3 ``model.fit`` on the
  PyTorch backend (``pip install gradprobe[keras]``).
* :mod:`gradprobe.integrations.tensorboard` and :mod:`gradprobe.integrations.wandb`: a run as
  TensorBoard event files or a W&B run, exported or followed live (``gradprobe export``;
  ``pip install gradprobe[tensorboard]``, ``gradprobe[wandb]``); shared tags in
  :mod:`gradprobe.integrations.export`.

Importing this package imports no framework; ``gp.integrations.lightning`` (an attribute) or
``from gradprobe.integrations.lightning import GradprobeCallback`` imports it. A framework that is
not installed raises ``ModuleNotFoundError`` naming the extra to install. See
docs/integrations.md.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS = {"huggingface": "huggingface", "lightning": "lightning", "keras": "keras",
          "tensorboard": "tensorboard", "wandb": "wandb"}
"""Submodule -> the extra that installs its framework."""


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` (a framework), or raise ``ModuleNotFoundError`` naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ModuleNotFoundError(
            f"gradprobe's {extra} integration needs {module!r}, which cannot be imported "
            f"({err}); install it with: pip install 'gradprobe[{extra}]'", name=module,
        ) from err


def __getattr__(name: str) -> ModuleType:
    if name in EXTRAS:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(EXTRAS))


__all__ = ["EXTRAS", "require"]
