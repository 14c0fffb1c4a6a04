"""A study file's scales, named once: ``full`` (the file's top level) and ``cpu`` (its ``[cpu]``
table, run without CUDA). Its own module so that readers of runs (``analysis``) check a scale
without importing the study-file machinery (and torch)."""

SCALES = ("cpu", "full")
