"""llama-server's slot endpoints: `GET /slots` (each slot's state) and `POST /slots/{id}?action=save|restore|erase`
(a slot's KV state to a file under `--slot-save-path` and back; or dropped).

Owns: the file-name rule (a plain name inside the save folder), the actions' answers in llama-server's shape
(`id_slot`, `filename`, `n_saved` / `n_restored` tokens, `n_written` / `n_read` bytes, `timings`; `n_erased`),
and their errors (400 for a bad name, action, foreign or corrupt file or a busy slot; 404 for no such slot;
501 when the server was started without a save folder).
Not: the file format and its model check (kiln/prompt_cache.py: a file another model made is refused), when
the engine touches a slot (kiln/engine.py `slot_call`: between iterations, only while the slot is idle).
A restored slot is what a finished request leaves: the next prompt sharing its tokens' prefix reuses them.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from kiln.errors import KilnError
from kiln.server import adapters
from kiln.server import protocol as P

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def file_in(folder: str | None, body) -> tuple[str, Path]:
    """(the body's `filename`, its path in the save folder): a plain name of letters, digits and . _ - only."""
    if folder is None:
        raise P.APIError(501, "this server does not save slots: start it with --slot-save-path DIR",
                         code="not_supported")
    name = body.get("filename") if isinstance(body, dict) else None
    if not isinstance(name, str) or not name or len(name) > 255 or not set(name) <= _NAME_CHARS \
            or name.strip(".") == "":
        raise P.APIError(400, "filename must be a plain file name (letters, digits, '.', '_', '-'; no folders)",
                         param="filename", code="invalid_filename")
    return name, Path(folder) / name


def _adapter_index(st, name: str | None, file: str) -> int:
    """The entry of the adapter a saved slot's keys were computed under, on this server; KilnError if not loaded."""
    if name is None:
        return 0
    loaded = adapters.names(st)
    if name not in loaded:
        raise KilnError(f"{file} was saved under the adapter {name!r}, which this server has not loaded "
                        f"(--adapter {name}=PATH)")
    return loaded.index(name) + 1


async def act(st, slot: str, action: str, body) -> dict:
    """One slot action for the server state `st` (its engine, model, tokenizer and save folder)."""
    from kiln import prompt_cache
    if not slot.isdigit() or int(slot) >= st.engine.n_slots:
        raise P.APIError(404, f"slot {slot!r} does not exist: this server has slots 0..{st.engine.n_slots - 1}",
                         code="slot_not_found")
    index, t0 = int(slot), time.perf_counter()
    if action == "erase":
        def run(cache, s):
            n = len(s.tokens)
            s.tokens.clear()
            return {"id_slot": index, "n_erased": n}
    elif action in ("save", "restore"):
        name, path = file_in(st.slot_save_path, body)
        if action == "save":
            def run(cache, s):
                tmp = path.with_name(f".{name}.{os.getpid()}.part")
                a, scale = s.adapter  # (AdapterBank entry, scale): a file records the adapter's name
                adapter = {"adapter": adapters.names(st)[a - 1] if a else None, "adapter_scale": scale}
                try:
                    size = prompt_cache.save(tmp, st.model, st.tokenizer, cache, s.tokens, adapter)
                    os.replace(tmp, path)
                finally:
                    tmp.unlink(missing_ok=True)
                return {"id_slot": index, "filename": name, "n_saved": len(s.tokens), "n_written": size}
        else:
            def run(cache, s):
                header, parts = prompt_cache.load(path, st.model, st.tokenizer)
                ids = [int(t) for t in header["tokens"]]
                if len(ids) > st.engine.ctx_size:
                    raise KilnError(f"{name} holds {len(ids)} tokens; this server's slots hold {st.engine.ctx_size}")
                adapter = _adapter_index(st, header.get("adapter"), name)
                prompt_cache.restore(cache, header, parts, len(ids))
                s.tokens[:] = ids
                s.adapter = (adapter, float(header.get("adapter_scale", 1.0))) if adapter else (0, 1.0)
                return {"id_slot": index, "filename": name, "n_restored": len(ids), "n_read": path.stat().st_size}
    else:
        raise P.APIError(400, f"unknown slot action {action!r}: save, restore or erase", param="action",
                         code="invalid_action")
    try:
        out = await asyncio.wrap_future(st.engine.slot_call(index, run))
    except KilnError as e:
        raise P.APIError(400, str(e), code="slot_error") from None
    except OSError as e:
        raise P.APIError(400, f"{action} {getattr(e, 'filename', '') or ''}: {e.strerror or e}",
                         code="slot_error") from None
    if action != "erase":
        out["timings"] = {f"{action}_ms": 1e3 * (time.perf_counter() - t0)}
    return out
