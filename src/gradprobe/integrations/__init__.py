"""Adapters of the Probe to training frameworks, each imported only when used.

* :mod:`gradprobe.integrations.huggingface`: ``GradprobeCallback`` for ``transformers.Trainer``
  (``pip install gradprobe[huggingface]``).
* :mod:`gradprobe.integrations.tensorboard` and :mod:`gradprobe.integrations.wandb`: a run as
  TensorBoard event files or a W&B run, exported or followed live (``gradprobe export``;
  ``pip install gradprobe[tensorboard]``, ``gradprobe[wandb]``); shared tags in
  :mod:`gradprobe.integrations.export`.

Importing this package imports no framework; see docs/integrations.md.
"""
