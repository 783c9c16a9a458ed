"""Marks csrc/ as the package data ksplice_py._csrc (see pyproject, resources.py)."""
