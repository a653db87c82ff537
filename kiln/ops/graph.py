"""CUDA-graph capture of a forward that reads and writes only static buffers.

Owns: `capture_graph(forward, pool)` → (graph, its static output), the one capture routine that the batch-1
Decoder (generate.py), the engine's batched step (engine_step.py) and a split model's GPU blocks (split.py)
share. Not: what is captured, when, or which buffers are static (the callers decide).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def capture_graph(forward: Callable[[], object], pool=None) -> tuple[torch.cuda.CUDAGraph, object]:
    """(graph, its static output) of `forward`, after two warm-up runs on a side stream (Triton compiles and
    autotunes there, outside the capture). `forward` reads and writes only static buffers. `pool`: a memory
    pool shared with other graphs that never run at the same time (torch.cuda.graph_pool_handle)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = forward()
    return graph, out
