"""Display: figures (matplotlib), later HTML and terminal reports.

Nothing here computes a statistic: it draws what the run, the lab or the diagnosis computed.
Importing this package does not import matplotlib; :mod:`gradprobe.report.style` does.
"""
