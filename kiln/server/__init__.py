"""kiln's OpenAI-compatible server: `create_app` (an ASGI app) and `serve` (run it in-process), imported lazily
so that `import kiln.server` needs no FastAPI. The rest: app.py and the modules it names.

    model, tok = kiln.load("qwen2.5-coder-0.5b")
    kiln.server.serve(model, tok, port=8080, api_key="secret", n_slots=4)       # blocks
    app = kiln.server.create_app(model=model, tokenizer=tok)                      # or: uvicorn.run(app)
"""

from __future__ import annotations


def __getattr__(name: str):
    if name in __all__:
        from kiln.server import app
        return getattr(app, name)
    raise AttributeError(f"module 'kiln.server' has no attribute {name!r}")


__all__ = ["create_app", "serve"]
