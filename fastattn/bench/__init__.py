"""`python -m fastattn bench`: fastattn against what a user would call instead, side by side in
one process. cases (the grid's shapes and FLOPs), timing (medians, turns, the hardware's peaks),
attention (the grid: every backend and peer on a case), decode and packed (KV-cache decoding and
varlen batches), isa (the CPU kernel per ISA table, a process each), models (modules and whole
models), record_report (a record's tables, charts, the README's markdown), run (all of it, with its
progress). And the sweeps `python -m fastattn tune` runs: triton_sweep (the Triton kernels' launch
configurations) and dispatch_sweep (`--dispatch`: this machine's dispatch table)."""
