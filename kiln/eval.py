"""`kiln perplexity`: perplexity and KL divergence of a model on a text, as llama-perplexity computes them.

Owns: the chunking rule of llama.cpp's tools/perplexity (the text's tokens — with a BOS where the model's
tokenizer adds one — cut into chunks of n_ctx; the chunk's first token replaced by BOS where the model adds
one; each chunk run alone from position 0; the second half of each chunk scored: the predictions of tokens
n_ctx/2 + 1 .. n_ctx - 1; PPL = exp(mean NLL), its error ppl * sqrt(var(log p) / (count - 1))), the
reference-distribution file (`--kl-divergence-base`: the scored positions' log-probabilities, float16) and
the comparison statistics (`--kl-divergence`: mean / max / 99.9% KL(base || model), same top-1 %, RMS of
the change in the probability of the text's next token), as llama-perplexity reports them.
Not: loading (load.py), the forward itself (models/).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kiln.errors import KilnError


@dataclass
class Perplexity:
    ppl: float
    error: float  # one standard error of the estimate, as llama-perplexity's "+/-"
    count: int  # tokens scored
    chunks: int
    running: list[float] = field(default_factory=list)  # PPL after each chunk ([1]…, [2]… in llama's output)


def chunks(tokens: list[int], n_ctx: int, n_chunks: int | None, bos: int | None) -> list[list[int]]:
    """llama-perplexity's chunks: n_ctx tokens each, the first set to BOS where the model adds one."""
    if n_ctx < 4:
        raise KilnError(f"--ctx-size {n_ctx}: must be at least 4")
    if len(tokens) < 2 * n_ctx:
        raise KilnError(f"the text has {len(tokens)} tokens; it needs at least 2 * ctx-size = {2 * n_ctx} "
                        f"(give a longer text or a smaller --ctx-size)")
    n = len(tokens) // n_ctx
    if n_chunks is not None:
        if n_chunks < 1:
            raise KilnError(f"--chunks {n_chunks}: must be at least 1")
        n = min(n, n_chunks)
    out = []
    for i in range(n):
        c = tokens[i * n_ctx:(i + 1) * n_ctx]
        if bos is not None:
            c = [bos] + c[1:]
        out.append(c)
    return out


@torch.inference_mode()
def scored_logprobs(model, chunk: list[int]) -> torch.Tensor:
    """log p(· | prefix) at the scored positions of one chunk: (n_ctx - 1 - n_ctx/2, V) float32, row j the
    distribution over the token at n_ctx/2 + 1 + j."""
    device = next(model.parameters()).device
    n_ctx = len(chunk)
    first = n_ctx // 2
    logits = model(torch.tensor([chunk], device=device), last_only=slice(first, n_ctx - 1))[0].float()  # (n, V)
    return logits.log_softmax(-1).cpu()


def perplexity(model, tokenizer, text: str, n_ctx: int = 512, n_chunks: int | None = None,
               progress: bool = False, keep: list | None = None) -> Perplexity:
    """PPL of the model on the text; `keep` (a list) receives (chunk ids, scored log-probs) per chunk."""
    from kiln.progress import bar

    bos = tokenizer.bos_token_id if tokenizer.add_bos else None
    parts = chunks(tokenizer.encode(text), n_ctx, n_chunks, bos)  # as llama-perplexity: special tokens parsed
    nll = nll2 = 0.0
    count, running = 0, []
    for chunk in bar(parts, desc="perplexity", unit="chunk", enabled=progress):
        lp = scored_logprobs(model, chunk)
        target = torch.tensor(chunk[n_ctx // 2 + 1:])
        picked = lp.gather(1, target[:, None])[:, 0].double()  # (n,) log p of the text's tokens
        nll -= float(picked.sum())
        nll2 += float((picked * picked).sum())
        count += picked.shape[0]
        running.append(math.exp(nll / count))
        if keep is not None:
            keep.append((chunk, lp))
    mean, mean2 = nll / count, nll2 / count
    var = mean2 - mean * mean
    ppl = math.exp(mean)
    err = ppl * math.sqrt(var / (count - 1)) if var > 0 and count > 1 else float("nan")
    return Perplexity(ppl, err, count, len(parts), running)


def save_base(path: Path, n_ctx: int, kept: list) -> None:
    """The reference distributions (`--kl-divergence-base`): token ids and float16 log-probs per chunk."""
    tmp = path.with_name(path.name + ".part")
    torch.save({"format": "kiln-kl-base-1", "n_ctx": n_ctx, "tokens": [c for c, _ in kept],
                "logprobs": [lp.half() for _, lp in kept]}, tmp)
    os.replace(tmp, path)


def load_base(path: Path) -> dict:
    try:
        base = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise KilnError(f"cannot read the KL-divergence base {path}: {e}") from None
    if not isinstance(base, dict) or base.get("format") != "kiln-kl-base-1":
        raise KilnError(f"{path} is not a kiln KL-divergence base (write one with --kl-divergence-base)")
    return base


def kl_stats(base: dict, kept: list) -> dict:
    """llama-perplexity's KL-divergence report from the base and this model's scored log-probs."""
    if [c for c, _ in kept] != base["tokens"][:len(kept)]:
        raise KilnError("the KL-divergence base was made from other tokens (another text, tokenizer or ctx-size)")
    kls, same, dp = [], [], []
    for (chunk, lp), blp in zip(kept, base["logprobs"]):
        blp = blp.float()
        if blp.shape != lp.shape:
            raise KilnError(f"the KL-divergence base has {blp.shape[-1]} vocabulary entries, this model "
                            f"{lp.shape[-1]}: compare models of one vocabulary")
        p = blp.exp()
        kls.append((p * (blp - lp)).sum(-1))
        same.append(blp.argmax(-1) == lp.argmax(-1))
        target = torch.tensor(chunk[len(chunk) // 2 + 1:])[:, None]
        dp.append(lp.gather(1, target)[:, 0].exp() - blp.gather(1, target)[:, 0].exp())
    kl, same, dp = torch.cat(kls).double(), torch.cat(same).double(), torch.cat(dp).double()
    n = kl.shape[0]
    return {"mean_kl": float(kl.mean()), "mean_kl_error": float(kl.std() / math.sqrt(n)) if n > 1 else float("nan"),
            "max_kl": float(kl.max()), "kl_99_9": float(torch.quantile(kl, 0.999)),
            "same_top1": float(same.mean()), "rms_dp": float(dp.pow(2).mean().sqrt()), "positions": n}


def check_chunking(a) -> None:
    """--ctx-size and --chunks of a command that cuts a text into chunks (perplexity, imatrix)."""
    if a.ctx_size < 4:
        raise KilnError(f"--ctx-size {a.ctx_size}: must be at least 4")
    if a.chunks is not None and a.chunks < 1:
        raise KilnError(f"--chunks {a.chunks}: must be at least 1")


def read_text(path, flag: str) -> str:
    """The UTF-8 text of the file a command's `flag` names, or a KilnError that says why not."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise KilnError(f"cannot read {flag} {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise KilnError(f"{flag} {path} is not UTF-8 text") from None


def main(argv: list[str]) -> int:
    from kiln.commands import _Parser, _load, _model_args, _quantized_arg, check_model_args

    p = _Parser(prog="kiln perplexity", description="Perplexity (and KL divergence against a saved base) of a "
                "model on a text, computed as llama-perplexity computes them.")
    _model_args(p)
    _quantized_arg(p)
    p.add_argument("--file", "-f", required=True, help="the text (UTF-8)")
    p.add_argument("--ctx-size", "-c", type=int, default=512, help="tokens per chunk (default 512)")
    p.add_argument("--chunks", type=int, default=None, help="score at most this many chunks (default: all)")
    p.add_argument("--kl-divergence-base", type=Path, default=None, metavar="OUT",
                   help="save the scored positions' distributions to OUT (the reference for --kl-divergence)")
    p.add_argument("--kl-divergence", type=Path, default=None, metavar="BASE",
                   help="compare with a base saved by --kl-divergence-base: mean/max/99.9%% KL, same top-1, RMS dp")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    a = p.parse_args(argv)
    check_chunking(a)
    check_model_args(a)
    text = read_text(a.file, "--file")
    base = load_base(a.kl_divergence) if a.kl_divergence else None
    if base is not None and base["n_ctx"] != a.ctx_size:
        raise KilnError(f"the base was made with --ctx-size {base['n_ctx']}; give the same here")
    model, tok = _load(a)
    kept = [] if (a.kl_divergence_base or base is not None) else None
    r = perplexity(model, tok, text, a.ctx_size, a.chunks, progress=True, keep=kept)
    out = {"ppl": r.ppl, "ppl_error": r.error, "tokens_scored": r.count, "chunks": r.chunks, "n_ctx": a.ctx_size}
    if a.kl_divergence_base:
        save_base(a.kl_divergence_base, a.ctx_size, kept)
    if base is not None:
        out.update(kl_stats(base, kept))
    if a.json:
        import json
        print(json.dumps(out))
        return 0
    print("".join(f"[{i + 1}]{v:.4f}," for i, v in enumerate(r.running)), file=sys.stderr)
    print(f"Final estimate: PPL = {r.ppl:.4f} +/- {r.error:.5f}  ({r.count} tokens in {r.chunks} chunks of {a.ctx_size})")
    if base is not None:
        print(f"Mean KLD: {out['mean_kl']:.6f} +/- {out['mean_kl_error']:.6f}\nMaximum KLD: {out['max_kl']:.6f}\n"
              f"99.9%   KLD: {out['kl_99_9']:.6f}\nSame top p: {100 * out['same_top1']:.3f} %\n"
              f"RMS Δp: {100 * out['rms_dp']:.3f} %")
    return 0
