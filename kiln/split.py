"""CPU + GPU layer split: which device (and which kind of layer) each block lives and runs on.

Owns: `Place` (a device and whether its layers stay compact), `layer_places(n_layers, n_gpu_layers, ...)`
(llama.cpp's rule: the last N blocks and the output head on the GPU, the embedding and the other blocks on the
CPU) and `run_blocks(layers, x, residual, step)`, the loop every model family runs its blocks with: where the
place changes, the activations (and the step's positions, RoPE tables and masks; a batched-rows step's per-row
positions and slot index too: `on_device`) cross once; `input_device`, where a model's token ids go;
`DeviceGraphs`, the CUDA graphs a one-token step replays for its runs of GPU blocks (`gpu_blocks`: has it any).
Not: building a split model (load.build_split), the plan of how many layers fit (fit.py), the KV cache storage
(cache.py keeps one tensor per layer on that layer's device when the model has `places`), kernels.

A place is a group, not just a device: two groups on the CPU (float32 blocks, then compact blocks) run
the same crossing code as CPU + GPU, which is how the split is tested on a machine without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kiln.cache import GRAPH, PREFILL, ROWS, KVCache, RowsView
from kiln.errors import KilnError
from kiln.ops import use_triton
from kiln.ops.graph import capture_graph


@dataclass(frozen=True)
class Place:
    device: str = "cpu"
    compact: bool = True  # CPU: quant/cpu.py compact layers (else float32); CUDA: packed QuantLinear

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if torch.device(self.device).type == "cpu" else torch.bfloat16


def layer_places(n_layers: int, n_gpu_layers: int, gpu: str = "cuda", cpu_compact: bool = True) -> list[Place]:
    """One Place per block: the last `n_gpu_layers` on `gpu`, the others on the CPU (llama.cpp's order:
    activations cross once, CPU → GPU, and the output head sits with the last block)."""
    if not 0 <= n_gpu_layers <= n_layers:
        raise KilnError(f"n_gpu_layers must be between 0 and {n_layers} (the model's layers), got {n_gpu_layers}")
    n_cpu = n_layers - n_gpu_layers
    return [Place("cpu", cpu_compact)] * n_cpu + [Place(gpu, True)] * n_gpu_layers


def on_device(step, device: torch.device):
    """The step with what prepare() computed for this forward moved to `device`: positions, RoPE tables,
    masks, and for a batched-rows step (Step.rows, the engine's) its per-row positions and the slot index of
    its RowsView. A CUDA-graph step cannot cross: its inputs are static buffers on one device."""
    if step.kind == GRAPH:
        raise KilnError("a model split across devices runs eager steps only (no CUDA graph): "
                        "turn graphs off, or load the model on one device")
    rope = {k: r._replace(pos=r.pos.to(device), inv_freq=r.inv_freq.to(device)) for k, r in step.rope.items()}
    mask = {w: (m if m is None else m.to(device)) for w, m in step.mask.items()}
    cache = step.cache.to(device) if isinstance(step.cache, RowsView) else step.cache
    pos = step.pos.to(device) if isinstance(step.pos, torch.Tensor) else step.pos
    valid = None if step.valid is None else step.valid.to(device)
    return replace(step, cache=cache, pos=pos, valid=valid, positions=step.positions.to(device), rope=rope,
                   mask=mask)


def input_device(model, default) -> torch.device:
    """The device a model's token ids go to: a split model's embedding's (the CPU: build_split puts it there,
    compact or not; a compact table may hold no parameter to ask), else `default` (where the whole model
    runs)."""
    return torch.device(default) if getattr(model, "places", None) is None else torch.device("cpu")


def gpu_blocks(model) -> bool:
    """Is `model` split with some of its blocks on a CUDA device (whose steps DeviceGraphs can replay)?"""
    return any(torch.device(p.device).type == "cuda" for p in getattr(model, "places", None) or ())


def run_blocks(layers, x: torch.Tensor, residual, step, run=None):
    """x, residual through every block; where a block's place differs from the one before it (a split
    model: `block.place`), x, residual and the step cross to its device, once per boundary → x, residual.
    A run of blocks of one place that the step's `graphs` (DeviceGraphs) serve replays its graph, which
    takes x and the residual where they are; any other goes to `run(start, end, x, residual, step)` first
    (models/base.py's native CPU step), which returns (x, residual) or None: then block by block."""
    here, start = None, 0
    while start < len(layers):
        place = getattr(layers[start], "place", None)
        end = start + 1
        while end < len(layers) and getattr(layers[end], "place", None) == place:
            end += 1
        out, moved = None, place is not None and place != here
        if moved:
            here, dev = place, torch.device(place.device)
            if step.graphs is not None:
                out = step.graphs.run(layers, start, end, x, residual, step, dev)
            if out is None:  # in the place's dtype: a GPU group runs in bf16, as the whole model would there
                x = x.to(dev, place.dtype)
                residual = None if residual is None else residual.to(dev, place.dtype)
                step = on_device(step, dev)
        if out is None and run is not None:
            out = run(start, end, x, residual, step)
        if out is None:
            for layer in layers[start:end]:
                x, residual = layer(x, residual, step)
        else:
            x, residual = out
        start = end
    return x, residual


class DeviceGraphs:
    """CUDA graphs of a split model's runs of GPU blocks for one-token steps, one per run of blocks (and per
    row count), captured at its second use: a batch-1 Decoder's decode step (`Step.prefill(cache, pos,
    graphs=...)`) and the engine's batched rows (`Step.rows(view, pos, graphs=...)`).

    Eager, a split step's GPU half is a few hundred kernel launches from Python (~30 ms a token for 19 blocks
    of an 8B model, more than its CPU half); replayed, one launch. The graph reads x, the residual, the
    positions (and a batch's slot index) from static buffers, and its step has the form of the all-GPU decode
    graph's (`Step.graph`, or a static `Step.rows`: keys over the whole cache, slots past a row's position
    masked), so every later position replays it. Which steps it serves: `_serves`. `capture`: the capture
    routine (ops.graph.capture_graph; a test on a machine without CUDA passes one that re-runs the forward).
    `kinds`: the device types served (a test's second CPU group stands in for the GPU)."""

    def __init__(self, capture=None, kinds: tuple = ("cuda",)):
        self.capture, self.kinds = capture or capture_graph, kinds
        self.graphs: dict = {}  # (id(layers), a, b, residual given, rows) -> _Segment
        self._seen: set = set()
        self.pool = None

    def run(self, layers, a: int, b: int, x: torch.Tensor, residual, step, device: torch.device):
        """Blocks a..b-1 of `layers` (one place, on `device`; x, residual and the step still on the blocks'
        before) from a graph -> (x, residual) on `device`, valid until the next replay; None: not served."""
        if not self._serves(layers[a:b], x, step, device):
            return None
        key = (id(layers), a, b, residual is None, x.shape[0])
        seg = self.graphs.get(key)
        if seg is None or not seg.fits(step):
            if key not in self._seen:  # a one-off call captures nothing
                self._seen.add(key)
                return None
            if self.pool is None and device.type == "cuda":
                self.pool = torch.cuda.graph_pool_handle()
            seg = self.graphs[key] = _Segment(layers[a:b], x, residual, step, device, self.capture, self.pool)
        return seg.replay(x, residual, step)

    def _serves(self, blocks, x: torch.Tensor, step, device: torch.device) -> bool:
        if device.type not in self.kinds or x.shape[1] != 1 or torch.is_grad_enabled():
            return False
        if step.kind == PREFILL:
            ok = x.shape[0] == 1 and step.valid is None and isinstance(step.cache, KVCache)
        else:
            ok = step.kind == ROWS and isinstance(step.cache, RowsView)
        if not ok or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            return False
        return not any(m._forward_hooks or m._forward_pre_hooks for blk in blocks for m in blk.modules())


class _Segment:
    """One run of blocks captured for one-token steps: static x, residual, positions (and a batch's slots);
    the output pair."""

    def __init__(self, blocks, x: torch.Tensor, residual, step, device, capture, pool):
        self.step, self.rows = step, step.kind == ROWS
        self.cache = step.cache.cache if self.rows else step.cache  # a batch's: the slot cache behind its view
        dtype = blocks[0].place.dtype  # as run_blocks crosses
        self.x = x.to(device, dtype, copy=True)
        self.residual = None if residual is None else residual.to(device, dtype, copy=True)
        self.pos = torch.as_tensor(step.pos).to(device, torch.long, copy=True)  # () or (B,)
        self.slots = step.cache.slot_index.to(device, copy=True) if self.rows else None
        self.inv = {k: r.inv_freq.clone() for k, r in step.rope.items()}  # where the step was: a longrope
        self.inv_here = {k: v.to(device) for k, v in self.inv.items()}  # switch (fits) recaptures

        def forward():
            g = self._graph_step()
            h, r = self.x, self.residual
            for block in blocks:
                h, r = block(h, r, g)
            return h, r

        self.graph, self.out = capture(forward, pool)

    def _graph_step(self):
        """The step in the form the all-GPU graphs capture, at the static positions: a batch-1 step as
        `Step.graph`, a batch's as `Step.rows` over the whole slot cache; positions, RoPE tables and (built by
        the first layer that asks) masks computed from those tensors."""
        s = self.step
        positions = self.pos[..., None] + torch.arange(1, device=self.pos.device)  # (B, 1), or (1,) for a GRAPH step
        positions = positions if self.rows else positions.view(1)
        cache = RowsView(self.cache, self.slots, self.cache.max_len) if self.rows else self.cache
        rope = {k: r._replace(pos=positions, inv_freq=self.inv_here[k]) for k, r in s.rope.items()}
        return replace(s, kind=s.kind if self.rows else GRAPH, cache=cache, pos=self.pos, positions=positions,
                       rope=rope, mask={}, graphs=None, n_keys=self.cache.max_len,
                       fused=use_triton(self.x, s.policy))

    def fits(self, step) -> bool:
        """Does this graph compute `step`? Same cache, and the same RoPE frequencies (longrope switches them)."""
        cache = step.cache.cache if self.rows else step.cache
        return cache is self.cache and step.rope.keys() == self.inv.keys() and all(
            torch.equal(step.rope[k].inv_freq, v) for k, v in self.inv.items())

    def replay(self, x: torch.Tensor, residual, step):
        """x, the residual, the step's positions (and slots) from any device into the static inputs; replay."""
        self.x.copy_(x)
        if residual is not None:
            self.residual.copy_(residual)
        if self.rows:
            self.pos.copy_(step.pos)
            self.slots.copy_(step.cache.slot_index)
        else:
            self.pos.fill_(step.pos)
        self.graph.replay()
        return self.out
