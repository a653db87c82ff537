"""Which model a request names, and which LoRA adapter it runs under on a server that loaded some
(`kiln serve --adapter [NAME=]PATH`, repeatable).

Owns: the served model ids (the base's id, and `ID:NAME` per adapter, as /v1/models lists them) and a
request's choice among them: `model: "ID:NAME"` (or the adapter's bare NAME, as vLLM serves LoRAs), the
body's `adapter: NAME` (kiln's), or llama-server's `lora: [{"id": i, "scale": s}]` (i in --adapter order;
one adapter with a nonzero scale per request). `base` names the model without adapters. A request that
chooses nothing runs the first adapter (`kiln serve --adapter X` serves X), or the base when there is none.
Errors: 404 for a model id the server does not serve, 400 for an unknown adapter or conflicting choices.
Not: the adapters' math (finetune/bank.py), batching rows of different adapters (engine.py).
"""

from __future__ import annotations

from kiln.finetune.bank import BASE
from kiln.server import protocol as P


def names(st) -> list[str]:
    """The loaded adapters' names, in --adapter order."""
    bank = getattr(st.model, "adapter_bank", None)
    return [] if bank is None else list(bank.names)


def check_model(st, name: str | None) -> str | None:
    """The adapter a model id picks (an adapter's name or BASE; None for the server's own id or no id);
    404 for an id this server does not serve."""
    if name is None or name == st.model_id:
        return None
    loaded = names(st)
    base, sep, suffix = name.rpartition(":")
    if sep and base == st.model_id and (suffix in loaded or suffix == BASE):
        return suffix
    if name in loaded:
        return name
    served = [st.model_id] + [f"{st.model_id}:{n}" for n in loaded]
    raise P.APIError(404, f"the model {name!r} does not exist; this server serves "
                          f"{', '.join(map(repr, served))}", param="model", code="model_not_found")


def resolve(st, req: P.GenRequest) -> str:
    """Set `req.adapter_key` ((AdapterBank entry, scale); (0, 1.0) for the base) from the request's choice;
    returns the model id its response names."""
    loaded = names(st)
    chosen = check_model(st, req.model)
    if req.adapter is not None:
        if req.adapter != BASE and req.adapter not in loaded:
            have = f"this server loaded {', '.join(loaded)}" if loaded else "this server loaded none (--adapter)"
            raise P.bad("adapter", f"no adapter named {req.adapter!r}: {have}; {BASE!r} runs the model without one")
        if chosen is not None and chosen != req.adapter:
            raise P.bad("adapter", f"the model {req.model!r} and adapter {req.adapter!r} disagree; give one of them")
        chosen = req.adapter
    scale = 1.0
    if req.lora is not None:
        if chosen is not None:
            raise P.bad("lora", "lora chooses the adapter: drop the adapter field or the model's ':NAME'")
        on = [(i, s) for i, s in req.lora if s != 0]
        if len(on) > 1:
            raise P.bad("lora", "kiln runs one adapter per request: give one lora entry with a nonzero scale")
        for i, _ in on:
            if i >= len(loaded):
                raise P.bad("lora", f"no adapter with id {i}: this server loaded {len(loaded)} (ids 0..{len(loaded) - 1})")
        chosen, scale = (loaded[on[0][0]], on[0][1]) if on else (BASE, 1.0)
    if chosen is None:
        chosen = loaded[0] if loaded else BASE
    req.adapter_key = (0, 1.0) if chosen == BASE else (loaded.index(chosen) + 1, scale)
    return st.model_id if chosen == BASE else f"{st.model_id}:{chosen}"


def cards(st, card: dict) -> list[dict]:
    """/v1/models' entries: the base's `card`, then one per adapter (its parent the base, as vLLM lists LoRAs)."""
    return [card] + [{**card, "id": f"{st.model_id}:{n}", "parent": st.model_id, "root": st.model_id}
                     for n in names(st)]
