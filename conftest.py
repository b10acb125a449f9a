"""Doctests are collected from src/; skip the Triton backend where Triton is not installed.

Triton chooses between its interpreter and its compiler when a kernel (its own
``tl.sum`` included) is decorated, and torch.compile's tests import Triton
early. Without a GPU the Triton kernels are tested through the interpreter, so
it is switched on here, before anything imports Triton; set
``TRITON_INTERPRET=0`` to test them compiled on a GPU.
"""

import importlib.util
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

collect_ignore = []
if importlib.util.find_spec("triton") is None:
    collect_ignore.append("src/optiscope/kernels/triton")
