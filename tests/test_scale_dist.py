"""Two gloo processes on 127.0.0.1, each holding a shard: every rank returns the single-process value."""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import secorder

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

WORLD = 2
SHARDS = [[(0, 4), (4, 6)], [(6, 9), (9, 11)]]  # uneven shards and batches


def _problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(11, 3, dtype=torch.float64, generator=g)
    Y = torch.randn(11, dtype=torch.float64, generator=g)
    P = {
        "w": torch.randn(3, 2, dtype=torch.float64, generator=g),
        "v": torch.randn(2, dtype=torch.float64, generator=g),
    }
    return X, Y, P


def _f(p, x, y):
    return ((torch.tanh(x @ p["w"]) @ p["v"] - y) ** 2).mean()


def _model_fn(p, x):
    return torch.tanh(x @ p["w"]) @ p["v"].unsqueeze(-1)


def _quantities(P, data):
    tr = secorder.dataset_hessian_trace(_f, P, data)
    est, err = secorder.dataset_hessian_trace(
        _f, P, data, num_probes=6, chunk_size=2, with_stderr=True, generator=torch.Generator().manual_seed(7)
    )
    diag = secorder.dataset_fisher_diagonal(_model_fn, "mse", P, [(x, y.unsqueeze(-1)) for x, y in data])
    return {"exact": tr, "hutchinson": est, "stderr": err, "ggn_w": diag["w"], "ggn_v": diag["v"]}


def _worker(rank: int, port: int, out: str) -> None:
    """Run the rank's work, then leave with os._exit: at interpreter finalization Gloo's C++
    threads can still hold objects whose destruction aborts the process ("terminate called without
    an active exception", SIGABRT with no Python frame, about 1 run in 4 here; see the abandoned
    fix pytorch/pytorch#179291). Every result is written to disk before that point."""
    try:
        _work(rank, port, out)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _work(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    try:
        X, Y, P = _problem()
        data = [(X[a:b], Y[a:b]) for a, b in SHARDS[rank]]
        torch.save(_quantities(P, data), Path(out) / f"rank{rank}.pt")
        try:  # a rank-dependent seed: the probes differ between ranks
            secorder.dataset_hessian_trace(
                _f, P, data, num_probes=2, generator=torch.Generator().manual_seed(rank)
            )
            message = "no error"
        except ValueError as exc:
            message = str(exc)
        (Path(out) / f"rank{rank}.txt").write_text(message)
        if rank == 1:  # a NaN on one rank only: both ranks raise, neither waits for the timeout
            x = data[0][0].clone()
            x[0, 0] = float("nan")
            data = [(x, data[0][1]), *data[1:]]
        try:
            secorder.dataset_hessian_trace(_f, P, data)
            message = "no error"
        except (ValueError, RuntimeError) as exc:
            message = f"{type(exc).__name__}: {exc}"
        (Path(out) / f"rank{rank}.failure.txt").write_text(message)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_gloo_ranks_equal_single_process(tmp_path: Path) -> None:
    ctx = mp.start_processes(
        _worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two gloo processes did not finish within 120 s")
    X, Y, P = _problem()
    single = _quantities(P, [(X[a:b], Y[a:b]) for shard in SHARDS for a, b in shard])
    full = secorder.hessian_trace(_f)(P, X, Y)
    torch.testing.assert_close(single["exact"], full, rtol=1e-10, atol=1e-12)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for key, value in single.items():
            torch.testing.assert_close(got[key], value, rtol=1e-10, atol=1e-12, msg=f"rank {rank}, {key}")
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert "every rank must apply the same probes" in message and "same seed on every rank" in message
    assert "the inputs of batch 0 must be finite" in (tmp_path / "rank1.failure.txt").read_text()
    assert (
        "RuntimeError: dataset_hessian_trace(f, params, data): every rank must complete its pass"
        in (tmp_path / "rank0.failure.txt").read_text()
    )
