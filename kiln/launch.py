"""The ranks of a tensor-parallel run: who they are, how they meet, and how rank 0 leads the others.

Owns: `run` (a command's body over the ranks: load everywhere, lead on rank 0, follow elsewhere), `Ranks`
(rank, world size, local rank, read from the environment torchrun sets: RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), `start(world, argv)` (this process joins, or becomes, a group of
`world` ranks: under torchrun it joins; otherwise it spawns ranks 1..N-1 as copies of its own command and is
rank 0 itself), `init_group` (NCCL on CUDA, each rank on cuda:LOCAL_RANK; gloo on the CPU), and the
lead-follow protocol of generation:

- rank 0 owns tokenization, sampling and output; it runs the ordinary token loop (generate.generate_step)
  with a `LeaderPool`, whose Decoders announce every call before making it: a new cache (`get`), a prompt
  chunk (`prefill`: the ids), a decode step (`step`: the chosen token), a whole-sequence forward without a
  cache (`forward`: the ids; bench's agreement pass) — one small broadcast each;
- ranks 1..N-1 run `follow(model)`: they receive each announcement and make the same call on their own
  Decoder, so every forward (and every collective inside it) runs on all ranks in the same order;
- `LeaderEngine` (kiln serve) does the same for the batched engine: its creation (slots, context, cache
  types), the graphs' warm-up, prompt chunks, batched prefills and batched decode steps (the rows' tokens,
  positions and slots), which the followers make on an engine of their own (no requests, no sampling);
- `LeaderPool.close()` tells the followers to return.

The decode step stays whole on each rank: on CUDA each rank replays its own captured graph (the collectives
inside it), and rank 0's announcement of step n+1 is queued on the device behind step n without a host sync.
Not: cutting the model (parallel.py), the token loop (generate.py), the command line (commands.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from kiln.kv_types import CACHE_TYPES
from kiln.errors import KilnError
from kiln.engine import Engine
from kiln.engine_step import BatchStep
from kiln.decoder import Decoder, DecoderPool

OP_EXIT, OP_GET, OP_PREFILL, OP_STEP, OP_FORWARD = 0, 1, 2, 3, 4  # the batch-1 Decoder's calls
OP_ENGINE, OP_WARM_UP, OP_ROWS_STEP, OP_CHUNK, OP_ROWS_PREFILL = 5, 6, 7, 8, 9  # the batched engine's
KEEP = 1  # Decoders every rank's pool keeps: one number for all, so a size the leader builds anew (and captures,
#           with its collectives) is built anew on every follower too, never taken from a follower's longer memory


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    local_rank: int

    @classmethod
    def from_env(cls) -> Ranks | None:
        """The ranks torchrun (or kiln's own spawn) describes in the environment; None outside one."""
        if "WORLD_SIZE" not in os.environ:
            return None
        try:
            world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError:
            raise KilnError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
        if not 0 <= rank < world:
            raise KilnError(f"RANK {rank} is outside WORLD_SIZE {world}")
        return cls(rank, world, local)


def start(world: int | None, argv: list[str]) -> tuple[Ranks | None, list[subprocess.Popen]]:
    """This process's ranks for `-tp world` (None or 1, and no launcher: no tensor parallelism), and the
    followers it spawned (kiln's own launch: `argv` rerun as `python -m kiln.cli ...` with RANK set; under
    torchrun none). The process group is not made yet (`init_group`)."""
    env = Ranks.from_env()
    if env is not None and env.world > 1:
        if world not in (None, env.world):
            raise KilnError(f"--tensor-parallel {world} disagrees with the launcher's WORLD_SIZE {env.world}")
        return env, []
    if world is None or world == 1:
        return None, []
    if world < 1:
        raise KilnError(f"--tensor-parallel {world}: must be at least 1")
    return Ranks(0, world, 0), _spawn(world, argv)


def run(world: int | None, argv: list[str], device: str | None, load: Callable, lead: Callable,
        source: str | None = None) -> int:
    """A command over the ranks of a tensor-parallel group (`world` ranks, or the launcher's):
    `load(device, shard, is_rank0) -> (model, tokenizer)` on every rank, then on rank 0
    `lead(model, tokenizer, pool)` (a LeaderPool, closed afterwards) while the others `follow`. Returns the
    exit status: 0, or a spawned follower's first non-zero one. `source` (the model's name or path): where
    kiln spawns the ranks, fetched and checked to divide among them first (one download, one error, no
    process started)."""
    from kiln.parallel import Shard, check_file
    if Ranks.from_env() is None and world is not None and world > 1:  # kiln spawns: check what it can first
        cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
        if cuda and torch.cuda.device_count() < world:  # one GPU per rank on this host
            raise KilnError(f"--tensor-parallel {world} runs one rank per GPU, and this host has "
                            f"{torch.cuda.device_count()}; use fewer ranks (or torchrun over several hosts)")
        if source is not None:
            from kiln.hub import resolve
            check_file(resolve(str(source), progress=True), world)
    ranks, children = start(world, argv)
    if ranks is None:
        raise KilnError("internal: launch.run without ranks (-tp 1 runs in one process)")
    ok = False
    try:
        model, tok = load(init_group(ranks, device), Shard(ranks.rank, ranks.world), ranks.rank == 0)
        if ranks.rank:
            follow(model)
        else:
            pool = LeaderPool(model)
            interrupted = False
            try:
                with _sigterm_raises():
                    lead(model, tok, pool)
            except KeyboardInterrupt:  # Ctrl-C, perhaps inside a step: not told (its collectives may be half
                interrupted = True     # done), the followers kiln spawned are stopped (torchrun stops its own)
                raise
            finally:
                if not interrupted:
                    pool.close()
        ok = True
    finally:
        code = finish(children, ok)
    return code


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM as SystemExit while rank 0 leads, so that it still tells the followers to return (uvicorn
    re-raises the signal it caught once the server is down; by default that would end rank 0 on the spot)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(sig, frame):
        raise SystemExit(128 + sig)

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _spawn(world: int, argv: list[str]) -> list[subprocess.Popen]:
    """Ranks 1..world-1 as child processes on this host (rank 0 is this process): no stdin or stdout (rank 0
    owns them), stderr shared so that their errors show; they end with rank 0 (`_die_with_parent`)."""
    with socket.socket() as s:  # a free port for the rendezvous (TCPStore on rank 0)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = str(max(1, (os.cpu_count() or 1) // world))
    base = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world)}
    os.environ.update(base, RANK="0", LOCAL_RANK="0")
    if "OMP_NUM_THREADS" not in os.environ:  # the cores shared among the ranks (what torchrun does)
        os.environ["OMP_NUM_THREADS"] = threads
        torch.set_num_threads(int(threads))
    return [subprocess.Popen([sys.executable, "-m", "kiln.cli", *argv], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r)),
                             start_new_session=True, preexec_fn=_die_with_parent)
            for r in range(1, world)]


def _die_with_parent() -> None:
    """In a spawned follower, before it runs: end it when rank 0 ends (Linux: PR_SET_PDEATHSIG), however rank 0
    ends; in a session of its own, so that the terminal's Ctrl-C reaches rank 0 alone (which stops it)."""
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def init_group(ranks: Ranks, device: str | None) -> torch.device:
    """Join the process group (env://: MASTER_ADDR / MASTER_PORT); returns this rank's device: cuda:LOCAL_RANK
    with NCCL where CUDA is asked for (or is the default), else the CPU with gloo."""
    wants_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if device is not None and torch.device(device).index is not None:
        raise KilnError(f"--device {device}: with tensor parallelism each rank takes cuda:LOCAL_RANK; give "
                        f"--device cuda (CUDA_VISIBLE_DEVICES picks the GPUs)")
    if wants_cuda:
        if ranks.local_rank >= torch.cuda.device_count():
            raise KilnError(f"rank {ranks.rank} wants cuda:{ranks.local_rank} but this host has "
                            f"{torch.cuda.device_count()} CUDA device(s)")
        dev = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    dist.init_process_group("nccl" if wants_cuda else "gloo", init_method="env://", rank=ranks.rank,
                            world_size=ranks.world, timeout=WAIT, **({"device_id": dev} if wants_cuda else {}))
    return dev


# How long a collective may wait. Followers of an idle server wait in a broadcast for the next request, so
# torch's default (10-30 minutes) would end them; a rank that dies closes its gloo connections at once, but
# under NCCL the others notice only at this timeout.
WAIT = timedelta(days=30)


def finish(children: list[subprocess.Popen], ok: bool = True) -> int:
    """Leave the group and wait for spawned followers; 0, or the first non-zero exit status among them. After
    a failure on this rank (`ok` False) the followers it spawned are stopped: they would wait for it."""
    if not ok:
        for c in children:
            c.kill()
    if ok and dist.is_initialized():
        dist.destroy_process_group()
    codes = [c.wait() for c in children]
    return next((c for c in codes if c), 0)


# ---------------------------------------------------------------- lead and follow

class Link:
    """Rank 0's announcements to the followers: a header of HEADER int64 (the op, then its numbers), then the
    op's payload if any (ids, rows of a batch), each broadcast from rank 0 (on the device NCCL needs, or the
    CPU for gloo)."""

    HEADER = 8

    def __init__(self, device, group=None):
        self.device, self.group = torch.device(device), group

    def send(self, op: int, *nums: int, token: torch.Tensor | None = None):
        """Announce `op` with up to HEADER - 1 numbers; `token` (a device tensor: no host sync) goes in slot 2."""
        hdr = torch.tensor([op, *nums] + [0] * (self.HEADER - 1 - len(nums)), dtype=torch.long)
        hdr = hdr.to(self.device, non_blocking=True)
        if token is not None:
            hdr[2:3].copy_(token.reshape(1))
        dist.broadcast(hdr, 0, group=self.group)

    def recv(self) -> list[int]:
        hdr = torch.empty(self.HEADER, dtype=torch.long, device=self.device)
        dist.broadcast(hdr, 0, group=self.group)
        return hdr.tolist()

    def ids(self, ids: torch.Tensor | None = None, n: int = 0) -> torch.Tensor:
        """Rank 0 sends `ids` (1, n); a follower receives them."""
        return self.payload(ids, (1, n))

    def payload(self, x: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
        """Rank 0 sends x (int64 of `shape`); a follower (x None) receives it."""
        buf = x.to(self.device, torch.long).contiguous() if x is not None else \
            torch.empty(shape, dtype=torch.long, device=self.device)
        dist.broadcast(buf, 0, group=self.group)
        return buf


def _code(cache_type: str | None) -> int:
    return 0 if cache_type is None else 1 + CACHE_TYPES.index(cache_type)


def _type(code: int) -> str | None:
    return None if code == 0 else CACHE_TYPES[code - 1]


class LeaderDecoder(Decoder):
    """Rank 0's Decoder: each prompt chunk and decode step is announced to the followers, then run."""

    link: Link

    def prefill(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        self.link.send(OP_PREFILL, pos, ids.shape[1])
        self.link.ids(ids)
        return super().prefill(ids, pos)

    def step(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        self.link.send(OP_STEP, pos, token=token)
        return super().step(token, pos)


class LeaderPool(DecoderPool):
    """Rank 0's DecoderPool: `get` is announced, so that every follower takes the same Decoder from its own
    pool (same sizes, same keep: the pools stay alike)."""

    decoder_class = LeaderDecoder

    def __init__(self, model, keep: int = KEEP):
        super().__init__(model, keep)
        self.link = Link(next(model.parameters()).device, model.shard.group)

    def get(self, max_len: int, cache_type_k: str | None = None, cache_type_v: str | None = None, *,
            sliding: bool = True, max_kv_size: int | None = None, keep: int = 4) -> Decoder:
        from kiln.kv_types import cache_type
        kinds = [cache_type(t, None) if t is not None else None for t in (cache_type_k, cache_type_v)]
        self.link.send(OP_GET, max_len, *map(_code, kinds), int(sliding), max_kv_size or 0, keep)
        d = super().get(max_len, *kinds, sliding=sliding, max_kv_size=max_kv_size, keep=keep)
        d.link = self.link
        return d

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """model(ids) (a whole sequence, no cache) on every rank: logits (1, T, V)."""
        self.link.send(OP_FORWARD, 0, ids.shape[1])
        self.link.ids(ids)
        return self.model(ids)

    def close(self):
        """Tell the followers to return from `follow`."""
        self.link.send(OP_EXIT)


class _LeaderStep(BatchStep):
    """Rank 0's batched decode step (engine_step.BatchStep): each call announced with its rows, then made."""

    link: Link

    def __call__(self, tokens, pos: list[int], slots: list[int], adapters=None) -> torch.Tensor:
        """(`adapters`: none under tensor parallelism; kiln serve refuses --adapter with --tp.)"""
        rows = torch.tensor([pos, slots], dtype=torch.long).to(self.link.device)  # (2, B)
        tok = tokens.to(self.link.device, torch.long).view(1, -1) if isinstance(tokens, torch.Tensor) else \
            torch.tensor([tokens], dtype=torch.long, device=self.link.device)  # (1, B): device picks stay there
        self.link.send(OP_ROWS_STEP, len(pos))
        self.link.payload(torch.cat([tok, rows]), (3, len(pos)))
        return super().__call__(tokens, pos, slots)


class LeaderEngine(Engine):
    """Rank 0's engine (kiln serve -tp): its model calls — prompt chunks, batched prefills, batched decode
    steps, the graphs' warm-up — are announced to the followers, which make them on an engine of their own
    with the same slots, context and cache types (`follow`)."""

    step_class = _LeaderStep

    def __init__(self, model, tokenizer=None, **kw):
        super().__init__(model, tokenizer, **kw)
        self.link = self._step.link = Link(self.device, model.shard.group)
        self.link.send(OP_ENGINE, self.n_slots, self.ctx_size, int(self._step.static), _code(self.cache.type_k),
                       _code(self.cache.type_v))

    def warm_up(self) -> None:
        if self._thread is None and self._step.use_graphs:
            self.link.send(OP_WARM_UP)
        super().warm_up()

    def _chunk_forward(self, slot: int, ids: torch.Tensor, pos: int) -> torch.Tensor:
        self.link.send(OP_CHUNK, slot, ids.shape[1], pos)
        self.link.ids(ids)
        return super()._chunk_forward(slot, ids, pos)

    def _rows_forward(self, ids: torch.Tensor, pos: list[int], slots: list[int], last: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        rows = torch.tensor([pos, slots], dtype=torch.long, device=self.device).t()  # (B, 2)
        self.link.send(OP_ROWS_PREFILL, b, t)
        self.link.payload(torch.cat([ids, rows, last.view(b, 1)], 1), (b, t + 3))
        return super()._rows_forward(ids, pos, slots, last)


def follow(model, keep: int = KEEP) -> None:
    """A follower's loop (ranks 1..N-1): make each call rank 0 announces on this rank's own Decoders or
    engine, until rank 0 closes its pool."""
    link = Link(next(model.parameters()).device, model.shard.group)
    pool, decoder, engine = DecoderPool(model, keep), None, None
    with torch.inference_mode():
        while True:
            op, a, b, c, d, e, f, _ = link.recv()
            if op == OP_EXIT:
                return
            if op == OP_GET:
                decoder = pool.get(a, _type(b), _type(c), sliding=bool(d), max_kv_size=e or None, keep=f)
            elif op == OP_PREFILL:
                decoder.prefill(link.ids(n=b), a)
            elif op == OP_STEP:
                decoder.step(torch.tensor([b], device=link.device), a)
            elif op == OP_FORWARD:
                model(link.ids(n=b))
            elif op == OP_ENGINE:
                engine = Engine(model, None, n_slots=a, ctx_size=b, graphs=bool(c), cache_type_k=_type(d),
                                cache_type_v=_type(e))
            elif op == OP_WARM_UP:
                engine.warm_up()
            elif op == OP_ROWS_STEP:
                tok, pos, slots = link.payload(None, (3, a))
                engine._step(tok, pos.tolist(), slots.tolist())
            elif op == OP_CHUNK:
                engine._chunk_forward(a, link.ids(n=b), c)
            elif op == OP_ROWS_PREFILL:
                rows = link.payload(None, (a, b + 3))
                engine._rows_forward(rows[:, :b], rows[:, b].tolist(), rows[:, b + 1].tolist(), rows[:, b + 2])
            else:
                raise KilnError(f"internal: unknown tensor-parallel op {op}")
