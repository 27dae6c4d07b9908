"""The Triton kernels (GPU, or CPU tensors under TRITON_INTERPRET=1): the attention forward and
backward (attention), KV-cache decoding (decode), their launch configurations (tuning, shipped in
tuned/; swept by `python -m fastattn tune`, a tool: fastattn.bench.triton_sweep), and the compile
report (report).
Nothing here imports triton until a submodule is imported."""
