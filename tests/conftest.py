"""Test-session set-up.

Without CUDA, bnrewrite's Triton kernels are tested on CPU tensors under Triton's interpreter, which
must be switched on before ``triton`` is first imported; ``torch.compile`` tests may import it
earlier in the same process, so the switch is set here, before any test module is collected.
Inductor's CPU code generation does not use Triton, so no other test is affected.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
