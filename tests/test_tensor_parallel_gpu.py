"""Tensor parallelism on 2 GPUs: 2 processes over NCCL against one process on one GPU, through the
public API, the scheduler and the command line. Skipped unless 2 CUDA devices are visible.

What the CPU tests (``tests/test_tensor_parallel.py``, gloo) cannot show: NCCL, the all-reduces
inside the CUDA graphs of decode and packed steps (the GEMV's and flashcore's Triton kernels around
them), and 8-bit weights in the Triton kernels, all sharded. float32 checkpoints: TP=2 sums the
same products in another order, so logits agree within 1e-4 relative and greedy tokens are
identical; bfloat16 and 8-bit weights agree within their rounding, and every rank holds the same
bits. NVLink multicast stays off (NCCL_NVLS_ENABLE=0 and the others, as the lent machines require).
"""
import functools
import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.checkpoints import write_checkpoint
from tests.test_tensor_parallel import (CASES, PROMPTS, free_port, leave, run_8bit, run_cli, run_everything,
                                        scheduled_with_scores_and_penalties)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")]

NO_MULTICAST = dict(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")


def _rank_main(rank, world, port, out_dir, work):
    os.environ.update(NO_MULTICAST, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    work(Path(out_dir) / f"rank{rank}.pt")
    leave()
    os._exit(0)


def on_two_gpus(work, out_dir):
    """``work(out_path)`` in 2 processes over NCCL (GPUs 0 and 1); each rank's saved result (None where
    it saved none), in rank order."""
    os.environ.update(NO_MULTICAST)
    mp.start_processes(_rank_main, args=(2, free_port(), str(out_dir), work), nprocs=2, start_method="spawn")
    paths = [Path(out_dir) / f"rank{r}.pt" for r in range(2)]
    return [torch.load(p) if p.exists() else None for p in paths]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tp-gpu")
    write_checkpoint(folder, tokenizer="sentencepiece", n_layers=2, seed=11, **CASES["untied gqa2 llama3 rope"])
    return folder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tp2_on_two_gpus_equals_one_gpu(folder, tmp_path, dtype):
    work = functools.partial(run_everything, str(folder), device="cuda", dtype=dtype)
    work(tmp_path / "single.pt")
    single = torch.load(tmp_path / "single.pt")
    ranks = on_two_gpus(work, tmp_path)
    for key in ("logits", "segments"):
        assert torch.equal(ranks[0][key], ranks[1][key])  # every rank holds the same full logits
        assert rel(ranks[0][key], single[key]) < (1e-4 if dtype == torch.float32 else 2e-2), key
    assert ranks[0]["graph_kinds"] == single["graph_kinds"] and "decode" in single["graph_kinds"]
    for key in ("greedy", "seeded", "unseeded", "stream", "continued"):
        assert ranks[0][key] == ranks[1][key], key  # the ranks agree on every token
    if dtype == torch.float32:
        for key in ("greedy", "stream", "continued", "seeded"):
            assert ranks[0][key] == single[key], key


def test_tp2_8bit_on_two_gpus_equals_one_gpu(folder, tmp_path):
    """int8 and fp8 weights quantized at load, and int8 by quantize_model, in the Triton kernels, bf16."""
    work = functools.partial(run_8bit, str(folder), device="cuda", dtype=torch.bfloat16)
    work(tmp_path / "single.pt")
    single = torch.load(tmp_path / "single.pt")
    ranks = on_two_gpus(work, tmp_path)
    for quantize, (logits, _) in single.items():
        assert torch.equal(ranks[0][quantize][0], ranks[1][quantize][0]), quantize
        assert ranks[0][quantize][1] == ranks[1][quantize][1], quantize
        assert rel(ranks[0][quantize][0], logits) < 2e-2, quantize


def test_tp2_scheduler_on_two_gpus_equals_one_gpu(folder, tmp_path):
    """Packed steps with all-reduces in their graphs, prompt scoring and penalties: rank 0's tokens and
    prompt logprobs are one GPU's (float32)."""
    single = scheduled_with_scores_and_penalties(str(folder), device="cuda")
    ranks = on_two_gpus(functools.partial(scheduled_with_scores_and_penalties, str(folder), device="cuda"), tmp_path)
    assert ranks[1] is None  # the follower saves nothing
    assert [len(out["prompt"]) for out in single] == [0, 0, 55, 55, 0]
    for one, tp in zip(single, ranks[0]):
        assert [t for t, _ in tp["tokens"]] == [t for t, _ in one["tokens"]] and tp["end"] == one["end"]
        assert [(t, top) for t, _, top in tp["prompt"]] == [(t, top) for t, _, top in one["prompt"]]
        assert [lp for _, lp, _ in tp["prompt"]] == pytest.approx([lp for _, lp, _ in one["prompt"]], abs=1e-4)


def test_generate_script_with_tp_2_on_gpus_prints_what_one_gpu_prints(folder):
    common = ["--model", str(folder), "--max-new-tokens", "10", "--json", *PROMPTS]
    env = dict(NO_MULTICAST)
    single = run_cli(["scripts/generate.py", *common], env=env)
    launched = run_cli(["scripts/generate.py", "--tp", "2", *common], env=env)
    assert single.returncode == 0, single.stderr
    assert launched.returncode == 0, launched.stderr

    def tokens(stdout):
        lines = [json.loads(line) for line in stdout.decode().splitlines()]
        assert len(lines) == len(PROMPTS)  # one JSON line per prompt, not one per process
        return [(line["token_ids"], line["text"]) for line in lines]

    assert tokens(launched.stdout) == tokens(single.stdout)
