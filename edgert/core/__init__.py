"""Scheduling as pure bookkeeping, no tensors: sequences, the block allocator (tables, refcounts,
prefix cache), the shape menu, the scheduler and the plan it hands the runner."""
