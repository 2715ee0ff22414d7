"""Data parallelism gives the numbers of one process: real gloo process groups on CPU.

The runs use float64 and ``reparam_noise=keyed`` (the noise of ``z`` drawn per global batch,
:mod:`lit_vae.noise`), so that 2 processes with batch 16 and 1 process with batch 32 must agree
to rounding: per-step losses, gradients, parameters, logged curves, results. The data sizes are
odd, so the last global batch splits unevenly and no evaluation split divides by 2.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils.data import SequentialSampler

from lit_vae.data import EpochRandomSampler, TensorPairDataset
from lit_vae.sharding import BatchShard, GlobalBatchSampler, shard_sizes

from .ddp_probe import METRIC_SPLIT, METRIC_VALUES
from .distributed_helpers import (
    EXACT,
    assert_close_tensors,
    assert_matches_one_process,
    free_port,
    kill_group,
    load_probes,
    probe_overrides,
    run_console,
    subprocess_env,
    train_in_process,
    write_digits_splits,
)
from .helpers import BIN

# ---------------------------------------------------------------------------------- sampler


def _pass(sampler: GlobalBatchSampler, batch_size: int) -> list[list[int]]:
    order = list(sampler)
    batches, start = [], 0
    for index in range(sampler.num_batches):
        size = sampler.shard(index).size
        assert size <= batch_size
        batches.append(order[start : start + size])
        start += size
    assert start == len(order) == len(sampler)
    return batches


@pytest.mark.parametrize("num_items", [1, 5, 64, 67, 96, 97])
@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("even", [True, False])
def test_global_batches_are_the_one_process_batches(
    num_items: int, world_size: int, even: bool
) -> None:
    batch_size = 16
    dataset = TensorPairDataset(torch.zeros(num_items, 1), torch.zeros(num_items))
    one = list(EpochRandomSampler(dataset, seed=3))
    one_batches = [
        one[i : i + batch_size * world_size] for i in range(0, num_items, batch_size * world_size)
    ]
    ranks = [
        _pass(
            GlobalBatchSampler(
                EpochRandomSampler(dataset, seed=3),
                batch_size,
                num_replicas=world_size,
                rank=rank,
                even=even,
            ),
            batch_size,
        )
        for rank in range(world_size)
    ]
    kept = [b for b in one_batches if len(b) >= world_size or not even]
    for index, global_batch in enumerate(kept):
        shards = [batches[index] if index < len(batches) else [] for batches in ranks]
        assert [i for shard in shards for i in shard] == global_batch  # contiguous, rank order
        assert [len(s) for s in shards] == shard_sizes(len(global_batch), world_size)
    if even:  # every process takes the same steps, each with at least one item
        assert all(len(batches) == len(kept) for batches in ranks)
        assert all(len(b) >= 1 for batches in ranks for b in batches)
    else:  # evaluation sees every item exactly once
        assert sorted(i for batches in ranks for b in batches for i in b) == list(range(num_items))


def test_shards_and_epochs() -> None:
    dataset = TensorPairDataset(torch.zeros(67, 1), torch.zeros(67))
    rank1 = GlobalBatchSampler(EpochRandomSampler(dataset, 0), 16, num_replicas=2, rank=1)
    assert [rank1.shard(i) for i in range(rank1.num_batches)] == [
        BatchShard(16, 16, 32),
        BatchShard(16, 16, 32),
        BatchShard(2, 1, 3),
    ]
    rank1.set_epoch(4)
    reference = EpochRandomSampler(dataset, 0)
    reference.set_epoch(4)
    order = list(reference)
    assert list(rank1) == order[16:32] + order[48:64] + order[66:67]
    dropped = GlobalBatchSampler(
        SequentialSampler(dataset), 16, num_replicas=2, rank=0, drop_last=True
    )
    assert list(dropped) == list(range(16)) + list(range(32, 48))
    assert shard_sizes(7, 3) == [3, 2, 2]


def test_datamodule_shards_under_a_distributed_trainer() -> None:
    from types import SimpleNamespace

    from lit_vae.data import DigitsDataModule

    digits = DigitsDataModule(batch_size=16, eval_batch_size=50)
    loaders = {}
    for rank in range(2):
        digits.trainer = SimpleNamespace(world_size=2, global_rank=rank)  # type: ignore[assignment]
        loaders[rank] = (digits.train_dataloader(), digits.val_dataloader())
    for train, val in loaders.values():
        assert isinstance(train.sampler, GlobalBatchSampler)
        assert isinstance(val.sampler, GlobalBatchSampler)
        assert train.batch_size == 16
        assert not train.drop_last
    val_x = torch.cat([x for rank in range(2) for x, _ in loaders[rank][1]])
    assert val_x.shape[0] == digits.num_val  # no padding: each item once
    digits.trainer = None  # type: ignore[assignment]
    assert not isinstance(digits.train_dataloader().sampler, GlobalBatchSampler)


# ------------------------------------------------------------------------------ real runs


@pytest.fixture(scope="module")
def data_overrides(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return write_digits_splits(tmp_path_factory.mktemp("data"))


MIXTURE = ("prior=mixture", "prior.num_components=3", "posterior=cholesky")
VAMP = ("prior=vamp", "prior.num_components=4", "posterior=low_rank")


def _reference(overrides: list[str], run_dir: Path) -> Path:
    train_in_process(
        [
            *overrides,
            "data.batch_size=32",
            "data.eval_batch_size=8",
            *probe_overrides(run_dir / "probe"),
        ],
        run_dir,
    )
    return run_dir


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ddp_cpu_matches_one_process(data_overrides: list[str], tmp_path: Path) -> None:
    """``trainer=ddp_cpu`` (2 processes, batch 16 each) against 1 process with batch 32, with a
    learned mixture prior (Monte Carlo KL) and a full-covariance head."""
    overrides = [*data_overrides, *EXACT, *MIXTURE]
    reference = _reference(overrides, tmp_path / "one")
    run_dir, work_dir = tmp_path / "two", tmp_path / "cwd"
    work_dir.mkdir()
    run_console(
        *overrides,
        "trainer=ddp_cpu",
        "data.batch_size=16",
        "data.eval_batch_size=4",
        f"hydra.run.dir={run_dir}",
        *probe_overrides(run_dir / "probe"),
        cwd=work_dir,
    )
    assert_matches_one_process(run_dir, reference, world_size=2)

    # the learned prior and every other parameter or buffer moved, identically on both ranks
    rank0, rank1 = load_probes(run_dir / "probe")
    assert_close_tensors(rank1["state"], rank0["state"], tol=0.0)
    for key in ("prior.loc", "prior.log_scale", "prior.logits"):
        assert not torch.equal(rank0["state"][key], rank0["initial_state"][key]), key

    # PerSampleMean over uneven shards (5 and 8 rows): exact whole-set mean and Cov, what
    # test/nll and test/active_units rely on; a mean of the ranks' means would differ
    values = METRIC_VALUES
    for probe in (rank0, rank1):
        mean, mean_squares = probe["metric_check"]
        torch.testing.assert_close(mean, values.mean(0))
        torch.testing.assert_close(mean_squares - mean.square(), values.var(0, unbiased=False))
    naive = (values[:METRIC_SPLIT].mean(0) + values[METRIC_SPLIT:].mean(0)) / 2
    assert not torch.allclose(naive, values.mean(0))

    # only rank 0 writes: one run dir, one metrics file, no stray dirs where it was started
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        [
            ".hydra",
            "checkpoints",
            "hparams.yaml",
            "metrics.csv",
            "probe",
            "reconstructions.png",
            "results.json",
            "samples.png",
            "train.log",
            "train_ddp_process_1.log",
        ]
    )
    assert list(work_dir.iterdir()) == []


def _launch_node(
    overrides: list[str], node_rank: int, port: int, cwd: Path
) -> subprocess.Popen[str]:
    environment = {
        **os.environ,
        "WANDB_MODE": "disabled",
        **subprocess_env(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            NODE_RANK=str(node_rank),
            WORLD_SIZE="2",
            LOCAL_RANK="0",
        ),
    }
    return subprocess.Popen(
        [str(BIN / "lit-vae-train"), *overrides],
        cwd=cwd,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_nodes_match_one_process(data_overrides: list[str], tmp_path: Path) -> None:
    """2 nodes × 1 process on localhost, started as a cluster starts them (``MASTER_ADDR``,
    ``MASTER_PORT``, ``NODE_RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``; no process spawns another),
    with a VampPrior and a low-rank head, against 1 process."""
    overrides = [*data_overrides, *EXACT, *VAMP]
    reference = _reference(overrides, tmp_path / "one")
    run_dir = tmp_path / "nodes"  # one run dir on a shared file system
    node_overrides = [
        *overrides,
        "trainer=ddp_cpu",
        "trainer.devices=1",
        "trainer.num_nodes=2",
        "data.batch_size=16",
        "data.eval_batch_size=4",
        f"hydra.run.dir={run_dir}",
        *probe_overrides(run_dir / "probe"),
    ]
    port = free_port()
    nodes = [_launch_node(node_overrides, rank, port, tmp_path) for rank in range(2)]
    try:
        outputs = [node.communicate(timeout=200)[0] for node in nodes]
    finally:
        for node in nodes:
            kill_group(node)
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-4000:]
    assert_matches_one_process(run_dir, reference, world_size=2)
    rank0, rank1 = load_probes(run_dir / "probe")
    assert_close_tensors(rank1["state"], rank0["state"], tol=0.0)
    assert not torch.equal(
        rank0["state"]["prior.pseudo_inputs"], rank0["initial_state"]["prior.pseudo_inputs"]
    )
    assert not (run_dir / "train_ddp_process_1.log").exists()  # nobody spawned a process
