"""Diagnosis: from a run's frames to findings with evidence and ranked remedies."""

from gradprobe.diagnose.finding import SEVERITIES, Diagnosis, Evidence, Finding, Remedy, Severity

__all__ = ["SEVERITIES", "Diagnosis", "Evidence", "Finding", "Remedy", "Severity"]
