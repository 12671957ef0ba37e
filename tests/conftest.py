"""Without a GPU, the Triton kernels run in Triton's interpreter.

TRITON_INTERPRET is read when the kernels are defined, i.e. when `topk_lightning.ops.triton_kernels` is first
imported (lazily, by the first call with backend="triton"), so it is set here, before any test runs.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
