"""Run a function on N gloo ranks in fresh processes (CPU); failures re-raise in pytest."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, fn, *args) -> None:
    """fn(*args) on `world` ranks; each rank may assert (the first failure fails the test)."""
    mp.start_processes(_entry, args=(world, _free_port(), fn, args), nprocs=world, start_method="spawn")
