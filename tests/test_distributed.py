"""Process-group helpers: single process, and real gloo with 2 torchrun processes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, subprocess_env
from hrnet_cls import distributed


WORKER = """
import json, os, sys, torch
from hrnet_cls import distributed as d
info = d.init_distributed(timeout_s=60)
t = d.all_reduce_sum(torch.tensor([float(info.rank + 1)]))
bn = torch.nn.BatchNorm1d(2)
bn.running_mean.fill_(info.rank + 1.0)  # each rank's own statistics
result = {
    "rank": info.rank, "world_size": info.world_size, "local_rank": info.local_rank,
    "is_main": info.is_main, "device": str(info.device), "sum": t.item(),
    "buffers": d.broadcast_buffers(bn) or bn.running_mean.tolist(),
    "gathered": d.all_gather_object({"r": info.rank}),
    "broadcast": d.broadcast_object("from rank 0" if info.rank == 0 else None),
}
d.barrier()
d.cleanup()
open(os.path.join(sys.argv[1], f"rank{info.rank}.json"), "w").write(json.dumps(result))
"""


def test_single_process_without_torchrun(monkeypatch) -> None:
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = distributed.init_distributed()
    assert (info.rank, info.world_size, info.is_main) == (0, 1, True)
    assert not distributed.is_distributed()
    t = torch.tensor([2.0])
    assert distributed.all_reduce_sum(t).item() == 2.0
    bn = torch.nn.BatchNorm1d(2)
    distributed.broadcast_buffers(bn)
    assert bn.running_mean.tolist() == [0.0, 0.0]
    assert distributed.all_gather_object("x") == ["x"]
    assert distributed.broadcast_object("y") == "y"
    distributed.barrier()
    distributed.cleanup()


@pytest.mark.slow  # two interpreters importing torch and timm: ~8 s on 2 cores
def test_two_gloo_processes_under_torchrun(tmp_path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = subprocess_env(tmp_path)  # gloo on CPU even on a GPU machine
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, res in enumerate(results):
        assert (res["rank"], res["local_rank"], res["world_size"]) == (rank, rank, 2)
        assert res["is_main"] == (rank == 0) and res["device"] == "cpu"
        assert res["sum"] == 3.0  # 1 + 2
        assert res["buffers"] == [1.0, 1.0]  # rank 0's statistics everywhere
        assert res["gathered"] == [{"r": 0}, {"r": 1}]
        assert res["broadcast"] == "from rank 0"


def test_one_device_decision_names_the_gpu_of_each_rank() -> None:
    """validate.py and train.py take the device and the backend from one decision: a CPU device under
    torchrun on a GPU node gets gloo, and a GPU other than the rank's own is refused before NCCL
    is bound to cuda:LOCAL_RANK (cuda=True stands for a GPU node; the decision reads nothing else)."""
    choose = distributed.choose_device
    assert choose("", 1, 2, cuda=True) == torch.device("cuda", 1)
    assert choose("cuda", 3, 4, cuda=True) == torch.device("cuda", 3)
    assert choose("cpu", 1, 2, cuda=True) == torch.device("cpu")
    assert choose("cuda:1", 0, 1, cuda=True) == torch.device("cuda", 1)  # one process: any GPU
    assert choose("cuda:1", 1, 2, cuda=True) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"^--device cuda:1: under torchrun each rank uses its own GPU .*cuda:0"):
        choose("cuda:1", 0, 2, cuda=True, what="--device")
    assert choose("", 0, 2, cuda=False) == torch.device("cpu")
    with pytest.raises(ValueError, match="^device cuda: CUDA is not available"):
        choose("cuda", 0, 1, cuda=False)
