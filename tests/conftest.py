"""Session-wide test setup.

Without a GPU the Triton tests run the kernels in Triton's interpreter, which
Triton chooses when a function is decorated: ``TRITON_INTERPRET=1`` must be
set before anything imports Triton. Collecting other test files imports it
early (torchvision imports torch._dynamo, which imports Triton), so it is set
here, before any test file is collected. Nothing else reads it: torch's CPU
code does not use Triton.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
