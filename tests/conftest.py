import os

# Kernel output buffers start as NaN, so an element a kernel forgets to write fails the test.
os.environ["FASTATTN_POISON"] = "1"
# One launch configuration per Triton kernel (the shipped defaults, else the first candidate):
# tests check results, and tuning is tested on its own (test_tuning, test_gpu).
os.environ.setdefault("FASTATTN_TUNE", "0")

# Without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass
