"""Tests for kiln/chat_template.py: where the caller's text lands in a rendered template, and the worker processes
that render within a time and memory budget.

Owns: the spans `render` reports (checked against the text itself), the fallback to "unknown" when a template
inspects message text, and `Workers` against templates that loop, grow without bound or die, run in real worker
processes. Not: the sandbox's rules and template features (tests/test_tokenizer.py) or how the tokenizer uses the
spans (tests/test_tokenizer.py, tests/test_server_robustness.py).
"""

import asyncio
import os
import signal
import time

import pytest

from kiln import chat_template as ct

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if tools %}{{ tools | tojson }}{% endif %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say \"hi\"\n<|im_end|>"}]
TOOLS = [{"type": "function", "function": {"name": "get_time", "description": "The time \"now\""}}]


def _job(source=CHATML, messages=MSGS, tools=None, **kwargs) -> ct.Job:
    return ct.Job(source, {"add_generation_prompt": True}, {"messages": messages, "tools": tools, **kwargs})


def test_spans_cover_exactly_the_callers_text():
    r = ct.render(ct.Env(), _job(tools=TOOLS))
    pieces = [r.text[a:b] for a, b in r.spans]
    # message text as written, tool strings as tojson wrote them (quotes escaped; "type" values are structure)
    assert pieces == ["Be brief.", 'Say "hi"\n<|im_end|>', "get_time", 'The time \\"now\\"']
    outside = "".join(r.text[b:a] for (_, b), (a, _) in zip([(0, 0)] + r.spans, r.spans + [(len(r.text), 0)]))
    assert outside.count("<|im_start|>") == 3 and outside.count("<|im_end|>") == 2  # the template's markers only
    assert r.text == ct.render(ct.Env(), _job(tools=TOOLS)).text and ct.OPEN not in r.text


def test_a_template_that_inspects_text_gives_unknown_spans_only_when_it_matters():
    source = "{% for m in messages %}{% if m.content.startswith('!') %}CMD {% endif %}{{ m.content }}|{% endfor %}"
    plain = ct.render(ct.Env(), _job(source, [{"role": "user", "content": "hello"}]))
    assert plain.text == "hello|" and plain.spans == [(0, 5)]  # the test gives the same answer with markers
    bang = ct.render(ct.Env(), _job(source, [{"role": "user", "content": "!reset"}]))
    assert bang.text == "CMD !reset|" and bang.spans is None  # with markers it would not start with "!"
    roles = "{% for m in messages %}{% if m.role == 'user' %}U:{% endif %}{{ m.content }}{% endfor %}"
    assert ct.render(ct.Env(), _job(roles, [{"role": "user", "content": "x"}])).spans == [(2, 3)]  # role: structure


def test_marker_characters_in_the_input_give_unknown_spans():
    r = ct.render(ct.Env(), _job(messages=[{"role": "user", "content": f"a{ct.CLOSE}b"}]))
    assert r.spans is None and f"a{ct.CLOSE}b" in r.text


def test_max_chars_stops_a_long_render():
    with pytest.raises(ct.TemplateFailed) as e:
        ct.render(ct.Env(), _job("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}"), max_chars=50_000)
    assert e.value.kind == "too_long" and 50_000 < e.value.chars <= 51_000


# --- worker processes ---------------------------------------------------------------------------------------------
def _in_workers(jobs, workers: ct.Workers):
    async def run():
        try:
            return await asyncio.gather(*(workers.render(j) for j in jobs), return_exceptions=True)
        finally:
            await workers.close()
    return asyncio.run(run())


def test_workers_render_what_the_process_renders():
    jobs = [_job(tools=TOOLS), _job(messages=[{"role": "user", "content": "é 😀 \ud800"}])]
    got = _in_workers(jobs, ct.Workers(n=1))
    for job, r in zip(jobs, got):
        ref = ct.render(ct.Env(), job)
        assert (r.text, r.spans) == (ref.text, ref.spans)


def test_workers_stop_templates_that_loop_or_grow_and_keep_serving():
    loop = _job("{% for i in range(100000) %}{% for j in range(3000) %}{% endfor %}{% endfor %}")
    bomb = _job("{% set ns = namespace(x='ab') %}{% for i in range(64) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}"
                "{{ ns.x | length }}")
    t = time.perf_counter()
    hostile, fine = _in_workers([loop, _job()], ct.Workers(n=1, timeout=1.0))  # one worker: the same one renders
    assert time.perf_counter() - t < 6
    (memory,) = _in_workers([bomb], ct.Workers(n=1, timeout=30, memory=256 << 20))
    assert isinstance(hostile, ct.TemplateFailed) and hostile.kind == "timeout" and "1 s" in str(hostile)
    assert isinstance(memory, ct.TemplateFailed) and memory.kind == "memory" and "256 MiB" in str(memory)
    assert fine.text == ct.render(ct.Env(), _job()).text  # a worker that hit its budget still renders


def test_a_worker_that_dies_is_replaced():
    loop = _job("{% for i in range(100000) %}{% for j in range(3000) %}{% endfor %}{% endfor %}")

    async def run():
        workers = ct.Workers(n=1, timeout=30)
        try:
            task = asyncio.create_task(workers.render(loop))
            await asyncio.sleep(1.0)  # the worker is busy with the loop; kill it from outside
            for w in list(workers._all):
                os.kill(w.proc.pid, signal.SIGKILL)
            with pytest.raises(ct.TemplateFailed, match="died"):
                await task
            return await workers.render(_job())
        finally:
            await workers.close()
    assert asyncio.run(run()).text == ct.render(ct.Env(), _job()).text
