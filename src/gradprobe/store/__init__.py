"""The run directory: the crash-safe writer (:mod:`.writer`), the host-side frames of a flush
(:mod:`.frames`) and the reader :class:`~gradprobe.store.run.Run`. Imports nothing of torch."""
