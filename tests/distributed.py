"""Run a function on N gloo ranks in fresh processes (CPU); failures re-raise in pytest."""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@contextlib.contextmanager
def job_store():
    """The job's TCPStore, hosted by this (the parent) process as torchrun's agent hosts it; yields the env
    a rank needs to join it. The server binds port 0 and keeps its socket, so no other process can take the
    port between choosing and binding it (CI's EADDRINUSE when each rank-0 child bound a port chosen earlier)."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    try:
        yield {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True"}
    finally:
        del store


def _entry(rank: int, world: int, env: dict, fn, args):
    os.environ.update(env, RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, fn, *args) -> None:
    """fn(*args) on `world` ranks; each rank may assert (the first failure fails the test)."""
    with job_store() as env:
        mp.start_processes(_entry, args=(world, env, fn, args), nprocs=world, start_method="spawn")


# -- data and comparing an engine with one process ----------------------------------------------------------------
def packed_rows(vocab: int, batch: int, seq: int, seed: int):
    """(tokens, labels, doc_ids): rows of packed documents (two boundaries drawn per row), the first row
    left-padded (the padding is a document of its own with ignored labels); each document's last label is
    masked, as a loader does."""
    from model.transformer import IGNORE_INDEX
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq), generator=g)
    doc_ids = torch.zeros(batch, seq, dtype=torch.long)
    for r in range(batch):
        for c in sorted(torch.randint(1, seq, (2,), generator=g).tolist()):
            doc_ids[r, c:] += 1
    doc_ids[0, :3] = -1  # left padding
    labels = tokens.roll(-1, dims=1)
    last = doc_ids != doc_ids.roll(-1, dims=1)
    last[:, -1] = True
    labels[last] = IGNORE_INDEX
    labels[0, :3] = IGNORE_INDEX
    return tokens, labels, doc_ids


def close(got, want, what: str, tol: float) -> None:
    """got == want within tol, relative and relative to want's largest element."""
    scale = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(scale, 1e-12), msg=lambda m: f"{what}: {m}")


def check_step(ref, engine, mesh, rterms: dict, got: dict, tol: float, what: str) -> None:
    """One step of `engine` (its `step` returned `got`) against one process's `ref` (its accumulated loss
    terms `rterms`, its gradients): every term, every gradient of every stage, and the clipped norm."""
    import parallel
    for k, v in rterms.items():
        assert k in got, f"{k} missing from {sorted(got)}"
        close(torch.tensor(got[k], dtype=torch.float64), torch.tensor(v, dtype=torch.float64), f"{what} {k}", tol)
    rgrads = dict(ref.named_parameters())
    for s in engine.stages:
        for k, g in parallel.full_state(s, mesh, grads=True).items():
            if rgrads[k].grad is None:   # unused by the objective in one process: no gradient here either
                assert g is None or not g.any(), f"{what}: {k} has a gradient, one process has none"
                continue
            assert g is not None, f"{what}: no gradient for {k}"
            close(g, rgrads[k].grad, f"{what} grad {k}", tol)
    rnorm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    close(engine.clip_grad_norm_(1.0).to(rnorm.dtype), rnorm, f"{what} grad norm", tol)


def check_params(ref, engine, mesh, tol: float, what: str) -> None:
    """Every parameter of every stage of `engine` equals `ref`'s."""
    import parallel
    rparams = dict(ref.named_parameters())
    for s in engine.stages:
        for k, v in parallel.full_state(s, mesh).items():
            close(v, rparams[k].detach(), f"{what} {k}", tol)
