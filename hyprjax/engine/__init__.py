"""Paged serving engine: request state, the host-side page allocator, the scheduler and the runner."""
