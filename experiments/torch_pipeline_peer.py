"""The peer of ``bench_schedules.py`` and ``bench_lm.py``: torch.distributed.pipelining on the same model
and machine.

``--model mlp`` is jaxmp's ``mlp`` written in PyTorch: ``Linear(F, D)``, ``depth`` pre-norm residual
blocks ``x + down(gelu(up(LayerNorm(x))))``, ``Linear(D, classes)``, mean cross-entropy, Adam.
``--model gpt`` is jaxmp's ``gpt``: token and learned position embeddings, ``depth`` pre-norm blocks
(causal attention through ``scaled_dot_product_attention`` with one fused QKV projection, then the
GELU MLP), a final LayerNorm and the head, cross-entropy per token over random token ids. Ranks are CPU
processes on gloo, one pipeline stage each (two for the interleaved and zero-bubble schedules, in a V
for ZBV and DualPipeV); each rank uses ``threads // ranks`` intra-op threads, the one-process plain step
all ``threads``. DualPipeV needs ``--microbatches`` at least ``2 * --ranks``.

Prints one JSON object: the median step seconds of the plain step and of each schedule.

Needs PyTorch (an optional benchmark dependency, never one of jaxmp's)::

    python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch numpy
    /tmp/torchenv/bin/python experiments/torch_pipeline_peer.py --ranks 4 --microbatches 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

SCHEDULES = {  # name in the table -> (torch class, stages per rank, stages placed in a V)
    "ScheduleGPipe": ("ScheduleGPipe", 1, False),
    "Schedule1F1B": ("Schedule1F1B", 1, False),
    "ScheduleInterleaved1F1B": ("ScheduleInterleaved1F1B", 2, False),
    "ScheduleInterleavedZeroBubble": ("ScheduleInterleavedZeroBubble", 2, False),
    "ScheduleZBVZeroBubble": ("ScheduleZBVZeroBubble", 2, True),
    "ScheduleDualPipeV": ("ScheduleDualPipeV", 2, True),  # needs microbatches >= 2 * ranks
}


class Block(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(width), nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class Embedding(nn.Module):
    def __init__(self, vocab: int, seq: int, width: int):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, width), nn.Parameter(torch.randn(seq, width) * 0.02)

    def forward(self, ids):
        return self.tokens(ids) + self.positions[: ids.shape[1]]


class TransformerBlock(nn.Module):
    def __init__(self, width: int, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attention_norm, self.qkv, self.out = (
            nn.LayerNorm(width),
            nn.Linear(width, 3 * width),
            nn.Linear(width, width),
        )
        self.mlp = Block(width, hidden)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        o = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return self.mlp(x + self.out(o.transpose(1, 2).reshape(b, t, d)))


def layers(args) -> list[nn.Module]:
    torch.manual_seed(0)
    if args.model == "gpt":
        blocks = [TransformerBlock(args.width, args.hidden, args.heads) for _ in range(args.depth)]
        head = nn.Sequential(nn.LayerNorm(args.width), nn.Linear(args.width, args.classes, bias=False))
        return [Embedding(args.classes, args.seq, args.width), *blocks, head]
    blocks = [Block(args.width, args.hidden) for _ in range(args.depth)]
    return [nn.Linear(args.features, args.width), *blocks, nn.Linear(args.width, args.classes)]


def loss_fn(logits, labels):
    return nn.functional.cross_entropy(logits.flatten(0, -2), labels.flatten())


def batch(args):
    g = torch.Generator().manual_seed(0)
    if args.model == "gpt":
        ids = torch.randint(0, args.classes, (args.batch, args.seq + 1), generator=g)
        return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    x = torch.randn(args.batch, args.features, generator=g)
    return x, torch.randint(0, args.classes, (args.batch,), generator=g)


def timed(step, args) -> float:
    for _ in range(args.warmup):
        step()
    seconds = []
    for _ in range(args.steps):
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        step()
        if dist.is_initialized():
            dist.barrier()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def plain_step_seconds(args) -> float:
    torch.set_num_threads(args.threads)
    model = nn.Sequential(*layers(args))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = batch(args)

    def step():
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

    return timed(step, args)


def stage_modules(args, stages: int) -> list[nn.Sequential]:
    """The model cut into ``stages`` runs of consecutive blocks; embedding first, head last."""
    every = layers(args)
    blocks, per = every[1:-1], args.depth // stages
    runs = [list(blocks[i * per : (i + 1) * per]) for i in range(stages)]
    runs[0].insert(0, every[0])
    runs[-1].append(every[-1])
    return [nn.Sequential(*run) for run in runs]


def rank_main(rank: int, args, name: str, port: int, queue) -> None:
    from torch.distributed import pipelining

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=args.ranks)
    torch.set_num_threads(max(1, args.threads // args.ranks))
    cls_name, per_rank, v_shape = SCHEDULES[name]
    total = args.ranks * per_rank
    modules = stage_modules(args, total)
    looped = [i for i in range(total) if i % args.ranks == rank]
    mine = [rank, total - 1 - rank] if v_shape else looped  # a V: rank r holds stages r and 2R-1-r
    device = torch.device("cpu")
    stages = [pipelining.PipelineStage(modules[i], i, total, device) for i in mine]
    cls = getattr(pipelining, cls_name)
    schedule = cls(stages if per_rank > 1 else stages[0], n_microbatches=args.microbatches, loss_fn=loss_fn)
    params = [p for i in mine for p in modules[i].parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)
    x, y = batch(args)

    def step():
        opt.zero_grad()
        kwargs = {}
        if 0 in mine:
            kwargs["x"] = x
        if total - 1 in mine:
            kwargs["target"] = y
        if "x" in kwargs:
            schedule.step(kwargs.pop("x"), **kwargs)
        else:
            schedule.step(**kwargs)
        opt.step()

    seconds = timed(step, args)
    if rank == 0:
        queue.put(seconds)
    dist.destroy_process_group()


def pipelined_seconds(args, name: str, port: int) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(rank_main, args=(args, name, port, queue), nprocs=args.ranks, start_method="spawn")
    return queue.get()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    for flag, default in (("width", 512), ("hidden", 2048), ("depth", 8), ("batch", 1024), ("features", 784)):
        p.add_argument(f"--{flag}", type=int, default=default)
    p.add_argument("--model", choices=("mlp", "gpt"), default="mlp")
    p.add_argument("--classes", type=int, default=10, help="classes, or the vocabulary of --model gpt")
    p.add_argument("--seq", type=int, default=64, help="--model gpt: tokens per window")
    p.add_argument("--heads", type=int, default=4, help="--model gpt: attention heads")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--schedules", default=",".join(SCHEDULES))
    args = p.parse_args()
    result = {"plain": plain_step_seconds(args)}
    for i, name in enumerate(args.schedules.split(",")):
        result[name] = pipelined_seconds(args, name, 29500 + i)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
