"""Qwen3 (dense): the Llama block with per-head RMSNorm on queries and keys before RoPE, no biases.

Owns: Qwen3's argument defaults. Not: anything the Llama block already does (models/llama.py).
"""

from dataclasses import dataclass

from kiln.models import llama


@dataclass
class ModelArgs(llama.ModelArgs):
    qk_norm: bool = True
    use_sliding_window: bool = False


class Model(llama.Model):
    pass
