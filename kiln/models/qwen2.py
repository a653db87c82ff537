"""Qwen2 / Qwen2.5: the Llama block with biases on q, k and v (and an optional sliding window).

Owns: Qwen2's argument defaults. Not: anything the Llama block already does (models/llama.py).
"""

from dataclasses import dataclass

from kiln.models import llama


@dataclass
class ModelArgs(llama.ModelArgs):
    attention_bias: bool = True
    use_sliding_window: bool = False


class Model(llama.Model):
    pass
