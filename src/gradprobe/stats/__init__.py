"""The statistics of tensors as mergeable sufficient statistics (see :mod:`.schema`).

``schema`` (no torch) is all that storage and diagnosis need; ``eager``, ``batched`` and
``compiled`` compute the rows on the tensors' device, ``reference`` is the slow obvious definition
they are tested against, ``hist`` the device-side histograms. Nothing is imported here, so that
``gradprobe.stats.schema`` stays free of torch.
"""
