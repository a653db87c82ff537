"""LoRA layers over kiln's linear modules, and adapters in PEFT's format.

Owns: `LoRALinear` (a frozen base plus `scale * B(A(dropout(x)))`), `DequantLinear` (the QLoRA base: GGUF
blocks kept as they are, dequantized per layer on the fly in forward and again in backward, so no dense copy
of the base outlives one layer's matmul; on CUDA by the Triton kernel over planes repacked once beside the
blocks), `apply_lora` / `lora_parameters`, PEFT's key names and
`adapter_config.json` (`save_adapter`, `load_adapter`), and `merge` (W + scale * B @ A, for `kiln fuse`).
Not: training (trainer.py), data (data.py), loading the base (the trainer builds it through kiln.load's
`build_model`).

Gradients through a base: an `nn.Linear` is frozen in place; any other base with a `dequantize(dtype)`
(DequantLinear, QuantLinear, the compact CPU layers) runs its own forward and takes `grad @ W` in backward
with W dequantized there, so only adapters hold gradients and optimizer state.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kiln.errors import KilnError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PREFIX = "base_model.model."  # PEFT's prefix before the Hugging Face module name


class _FrozenMatmul(torch.autograd.Function):
    """y = base(x) with the base frozen; backward: dL/dx = dL/dy @ W, W dequantized for that one product."""

    @staticmethod
    def forward(ctx, x, base):
        ctx.base = base
        with torch.no_grad():
            return base(x)

    @staticmethod
    def backward(ctx, grad):
        w = ctx.base.dequantize(grad.dtype).to(grad.device)  # (N, K)
        return grad @ w, None


def frozen(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(base, nn.Linear) or not torch.is_grad_enabled() or not x.requires_grad:
        return base(x)
    return _FrozenMatmul.apply(x, base)


class DequantLinear(nn.Module):
    """A frozen linear layer over raw GGUF blocks (any type kiln reads): dense only inside one matmul."""

    def __init__(self, raw: torch.Tensor, qtype: int, shape: tuple[int, int], bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("raw", raw.reshape(-1).contiguous(), persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.qtype, self.out_features, self.in_features = qtype, *shape

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """The dense (N, K) weight in dtype on the blocks' device: on CUDA by the Triton dequantization kernel
        over the blocks repacked once into its planes (types it takes), else kiln's torch dequantization."""
        from kiln.quant import dequantize
        from kiln.quant.packed import FORMATS, repack
        shape = (self.out_features, self.in_features)
        if self.raw.is_cuda and self.qtype in FORMATS:
            if getattr(self, "_packed", None) is None or self._packed.device != self.raw.device:
                self._packed = repack(self.raw, self.qtype, shape)  # lossless; as large as the blocks
            from kiln.quant.dequant import dequantize_gpu
            return dequantize_gpu(self._packed, dtype)
        return dequantize(self.raw.cpu(), self.qtype, shape, dtype).to(self.raw.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}"


class LoRALinear(nn.Module):
    """base(x) + (alpha / r) * B(A(dropout(x))); A as PEFT initializes it, B zero (starts as the base)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, scale: float = 1.0):
        super().__init__()
        self.base, self.r, self.alpha = base, r, alpha
        self.in_features, self.out_features = base.in_features, base.out_features
        w = getattr(base, "weight", None)
        device = w.device if isinstance(w, torch.Tensor) else next(base.buffers(), torch.empty(0)).device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = scale * alpha / r  # `scale`: the user's --adapter-scale on top of alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.lora_A.weight.to(x.dtype)
        b = self.lora_B.weight.to(x.dtype)
        return frozen(self.base, x) + F.linear(F.linear(self.dropout(x), a), b) * self.scale

    def delta(self) -> torch.Tensor:
        """scale * B @ A: what merging adds to the base weight, (N, K) float32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scale


def layer_indices(model: nn.Module, num_layers: int | None) -> list[int]:
    """The last `num_layers` blocks (mlx-lm's --num-layers; None or -1: all)."""
    n = len(model.model.layers)
    if num_layers is None or num_layers < 0 or num_layers >= n:
        return list(range(n))
    if num_layers == 0:
        raise KilnError("--num-layers 0 trains nothing; give a positive count or -1 for all")
    return list(range(n - num_layers, n))


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets=DEFAULT_TARGETS, layers: list[int] | None = None, scale: float = 1.0) -> list[str]:
    """Wrap each targeted linear of the chosen blocks in a LoRALinear, freeze everything else; returns the
    Hugging Face names of the wrapped modules."""
    if r < 1:
        raise KilnError(f"LoRA rank {r}: must be at least 1")
    if not 0 <= dropout < 1:
        raise KilnError(f"LoRA dropout {dropout}: must be in [0, 1)")
    model.requires_grad_(False)
    layers = range(len(model.model.layers)) if layers is None else layers
    wrapped = []
    for i in layers:
        for parent_name, parent in model.model.layers[i].named_modules():
            if getattr(parent, "qkv", None) is not None or getattr(parent, "gate_up", None) is not None:
                raise KilnError("this model's projections are joined (a GPU or --quantized CPU load); LoRA needs "
                                "them apart: load it for training (kiln.finetune.trainer.load_base) or on CPU "
                                "with quantized=False")
            for attr, child in list(parent.named_children()):
                if attr in targets and hasattr(child, "in_features") and not isinstance(child, LoRALinear):
                    setattr(parent, attr, LoRALinear(child, r, alpha, dropout, scale))
                    wrapped.append(".".join(p for p in (f"model.layers.{i}", parent_name, attr) if p))
    if not wrapped:
        raise KilnError(f"no layer named {', '.join(targets)} in the chosen blocks; nothing to train")
    return wrapped


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """{PEFT key: tensor}: base_model.model.<HF module name>.lora_A.weight (r, K) and .lora_B.weight (N, r)."""
    state = {}
    for name, m in lora_modules(model).items():
        state[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().float().cpu().contiguous()
        state[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().float().cpu().contiguous()
    return state


def save_adapter(model: nn.Module, out, config: dict, name: str = "adapter_model.safetensors") -> Path:
    """adapter_config.json (PEFT's LoraConfig fields) and the weights under PEFT's key names."""
    from safetensors.torch import save_file
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (name + ".tmp")
    save_file(adapter_state(model), str(tmp), metadata={"format": "pt"})
    tmp.replace(out / name)  # a Ctrl-C mid-write never leaves a half adapter under the real name
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out / name


def peft_config(r, alpha, dropout, targets, layers, n_layers, base="") -> dict:
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
           "target_modules": sorted(set(targets)), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
           "base_model_name_or_path": base, "inference_mode": True}
    if list(layers) != list(range(n_layers)):
        cfg["layers_to_transform"], cfg["layers_pattern"] = list(layers), "layers"
    return cfg


def read_adapter(path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(adapter_config.json's fields, {HF module name: (A (r, in), B (out, r))}) of a PEFT LoRA folder."""
    from safetensors.torch import load_file
    path = Path(path)
    cfg_path, w_path = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise KilnError(f"{path} is not a PEFT adapter folder (needs adapter_config.json and "
                        f"adapter_model.safetensors)")
    try:
        cfg = json.loads(cfg_path.read_text())
        state = load_file(str(w_path))
    except (ValueError, OSError) as e:
        raise KilnError(f"cannot read the adapter in {path}: {e}") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora") \
            or cfg.get("use_rslora"):
        raise KilnError(f"{cfg_path}: only plain LoRA adapters are supported (no DoRA, rsLoRA, other PEFT types)")
    names = sorted({k[len(PREFIX):].rsplit(".lora_", 1)[0] for k in state if k.startswith(PREFIX)})
    if not names:
        raise KilnError(f"{w_path} holds no LoRA weights under PEFT's names ({PREFIX}...lora_A.weight)")
    r = int(cfg.get("r", 8))
    pairs = {}
    for name in names:
        a, b = state.get(f"{PREFIX}{name}.lora_A.weight"), state.get(f"{PREFIX}{name}.lora_B.weight")
        if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise KilnError(f"the adapter's weights for {name} are missing or not of shape (r={r}, in) / (out, r)")
        pairs[name] = (a, b)
    return cfg, pairs


def _joined_part(parent: nn.Module, attr: str):
    """(the Joined layer, part index) where `attr` (q_proj, ...) of parent was joined at load, else None."""
    from kiln.quant.swap import JOINS
    for joined, parts in JOINS.items():
        mod = getattr(parent, joined, None)
        if mod is not None and attr in parts and getattr(parent, attr, None) is None:
            return mod, parts.index(attr)
    return None


def load_adapter(model: nn.Module, path, scale: float = 1.0) -> list[str]:
    """Apply a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) to a loaded model."""
    cfg, pairs = read_adapter(path)
    r, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    for name, (a, b) in pairs.items():
        parent_name, attr = name.rsplit(".", 1)
        try:
            parent = model.get_submodule(parent_name)
            base = getattr(parent, attr) if _joined_part(parent, attr) is None else None
        except AttributeError:
            raise KilnError(f"the adapter names {name}, which this model does not have") from None
        joined = _joined_part(parent, attr)
        if joined is not None:  # q/k/v or gate/up joined at load (GPU, compact CPU): a LoRA beside the matmul
            mod, part = joined
            k = mod.groups[0].in_features
            if a.shape != (r, k) or b.shape != ([w for ws in mod.splits for w in ws][part], r):
                raise KilnError(f"the adapter's weights for {name} are not of shape (r={r}, in) / (out, r)")
            where = next(iter([*mod.parameters(), *mod.buffers()])).device
            mod.add_lora(part, a.float().to(where), b.float().to(where), scale * alpha / r)
            continue
        if a.shape != (r, base.in_features) or b.shape != (base.out_features, r):
            raise KilnError(f"the adapter's weights for {name} are missing or not of shape (r={r}, in) / (out, r)")
        layer = LoRALinear(base, r, alpha, 0.0, scale)
        with torch.no_grad():
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
        setattr(parent, attr, layer.requires_grad_(False))
        layer.base.requires_grad_(False)
    return list(pairs)


def merge(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by an nn.Linear of weight W + scale * B @ A (float32 or the base's dtype)."""
    for name, m in lora_modules(model).items():
        base = m.base
        w = base.weight.detach().float() if isinstance(base, nn.Linear) else base.dequantize(torch.float32)
        dtype = base.weight.dtype if isinstance(base, nn.Linear) else torch.float32
        bias = getattr(base, "bias", None)
        lin = nn.Linear(m.in_features, m.out_features, bias=bias is not None, device=w.device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(w + m.delta().to(w.device))
            if bias is not None:
                lin.bias.copy_(bias)
        parent_name, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), attr, lin.requires_grad_(False))
    return model
