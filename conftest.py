"""Doctests are collected from src/; skip the Triton backend where Triton is not installed."""

import importlib.util

collect_ignore = []
if importlib.util.find_spec("triton") is None:
    collect_ignore.append("src/optiscope/kernels/triton")
