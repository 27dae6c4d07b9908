import os

# Kernel output buffers start as NaN, so an element a kernel forgets to write fails the test.
os.environ["FASTATTN_POISON"] = "1"
