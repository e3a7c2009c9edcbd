"""Adapters of the Probe to training frameworks, each imported only when used.

* :mod:`gradprobe.integrations.huggingface`: ``GradprobeCallback`` for ``transformers.Trainer``
  (``pip install gradprobe[huggingface]``).

Importing this package imports no framework; see docs/integrations.md.
"""
