"""The Probe and everything it needs while training runs: layer selection, hooks, parameter
statistics, the stage of small tensors, the device ring buffer (:mod:`.recorder`) and the
distributed rank. Import :class:`gradprobe.Probe` from the package facade."""
