"""Shared pytest setup."""

import os

import torch

# --- Triton kernels on CPU (kernel tests) -------------------------------------------------------
# triton.jit picks the interpreter when a kernel is decorated, i.e. when kernels/*.py is first
# imported, which may happen while collecting any test module; so the switch is set here, before
# collection. Without a GPU the interpreter is the only way Triton kernels can run at all.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
