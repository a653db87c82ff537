"""The ranks of a tensor-parallel run: who they are, how they meet, and how rank 0 leads the others.

Owns: `run` (a command's body over the ranks: load everywhere, lead on rank 0, follow elsewhere), `Ranks` (rank, world size, local rank, read from the environment torchrun sets: RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), `start(world, argv)` (this process joins, or becomes, a group of
`world` ranks: under torchrun it joins; otherwise it spawns ranks 1..N-1 as copies of its own command and is
rank 0 itself), `init_group` (NCCL on CUDA, each rank on cuda:LOCAL_RANK; gloo on the CPU), and the
lead-follow protocol of generation:

- rank 0 owns tokenization, sampling and output; it runs the ordinary token loop (generate.generate_step)
  with a `LeaderPool`, whose Decoders announce every call before making it: a new cache (`get`), a prompt
  chunk (`prefill`: the ids), a decode step (`step`: the chosen token), a whole-sequence forward without a
  cache (`forward`: the ids; bench's agreement pass) — one small broadcast each;
- ranks 1..N-1 run `follow(model)`: they receive each announcement and make the same call on their own
  Decoder, so every forward (and every collective inside it) runs on all ranks in the same order;
- `LeaderPool.close()` tells the followers to return.

The decode step stays whole on each rank: on CUDA each rank replays its own captured graph (the collectives
inside it), and rank 0's announcement of step n+1 is queued on the device behind step n without a host sync.
Not: cutting the model (parallel.py), the token loop (generate.py), the command line (commands.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kiln.cache import CACHE_TYPES
from kiln.errors import KilnError
from kiln.generate import Decoder, DecoderPool

OP_EXIT, OP_GET, OP_PREFILL, OP_STEP, OP_FORWARD = 0, 1, 2, 3, 4


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


def run(world: int | None, argv: list[str], device: str | None, load: Callable, lead: Callable) -> int | None:
    """A command over the ranks of a tensor-parallel group (None where there is none: `world` None or 1 and
    no launcher): `load(device, shard, is_rank0) -> (model, tokenizer)` on every rank, then on rank 0
    `lead(model, tokenizer, pool)` (a LeaderPool, closed afterwards) while the others `follow`. Returns the
    exit status: 0, or a spawned follower's first non-zero one."""
    from kiln.parallel import Shard
    ranks, children = start(world, argv)
    if ranks is None:
        return None
    ok = False
    try:
        model, tok = load(init_group(ranks, device), Shard(ranks.rank, ranks.world), ranks.rank == 0)
        if ranks.rank:
            follow(model)
        else:
            pool = LeaderPool(model, keep=1)
            try:
                lead(model, tok, pool)
            finally:
                pool.close()
        ok = True
    finally:
        code = finish(children, ok)
    return code


def _spawn(world: int, argv: list[str]) -> list[subprocess.Popen]:
    """Ranks 1..world-1 as child processes on this host (rank 0 is this process): no stdin or stdout (rank 0
    owns them), stderr shared so that their errors show."""
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
                             stdout=subprocess.DEVNULL, env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r)))
            for r in range(1, world)]


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
                            world_size=ranks.world, **({"device_id": dev} if wants_cuda else {}))
    return dev


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
    """Rank 0's announcements to the followers: a header (op, a, b, c) of int64, then the op's ids if any,
    each one broadcast from rank 0 (on the device NCCL needs, or the CPU for gloo)."""

    def __init__(self, device, group=None):
        self.device, self.group = torch.device(device), group

    def send(self, op: int, a: int = 0, b: int = 0, c: int = 0, token: torch.Tensor | None = None):
        hdr = torch.tensor([op, a, b, c], dtype=torch.long).to(self.device, non_blocking=True)
        if token is not None:  # the sampled token, still on the device: no host sync
            hdr[2:3].copy_(token.reshape(1))
        dist.broadcast(hdr, 0, group=self.group)

    def recv(self) -> list[int]:
        hdr = torch.empty(4, dtype=torch.long, device=self.device)
        dist.broadcast(hdr, 0, group=self.group)
        return hdr.tolist()

    def ids(self, ids: torch.Tensor | None = None, n: int = 0) -> torch.Tensor:
        """Rank 0 sends `ids` (1, n); a follower receives them."""
        buf = ids.contiguous() if ids is not None else torch.empty(1, n, dtype=torch.long, device=self.device)
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

    def __init__(self, model, keep: int = 2):
        super().__init__(model, keep)
        self.link = Link(next(model.parameters()).device, model.shard.group)

    def get(self, max_len: int, cache_type_k: str | None = None, cache_type_v: str | None = None) -> Decoder:
        from kiln.cache import cache_type
        kinds = [cache_type(t, None) if t is not None else None for t in (cache_type_k, cache_type_v)]
        self.link.send(OP_GET, max_len, *map(_code, kinds))
        d = super().get(max_len, *kinds)
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


def follow(model, keep: int = 2) -> None:
    """A follower's loop (ranks 1..N-1): make each call rank 0 announces on this rank's own Decoders, until
    rank 0 closes its pool."""
    link = Link(next(model.parameters()).device, model.shard.group)
    pool, decoder = DecoderPool(model, keep), None
    with torch.inference_mode():
        while True:
            op, a, b, c = link.recv()
            if op == OP_EXIT:
                return
            if op == OP_GET:
                decoder = pool.get(a, _type(b), _type(c))
            elif op == OP_PREFILL:
                decoder.prefill(link.ids(n=b), a)
            elif op == OP_STEP:
                decoder.step(torch.tensor([b], device=link.device), a)
            elif op == OP_FORWARD:
                model(link.ids(n=b))
            else:
                raise KilnError(f"internal: unknown tensor-parallel op {op}")
