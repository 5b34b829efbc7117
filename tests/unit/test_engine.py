"""The training step and epoch loop: no host sync per step, per-(seed, epoch, rank) noise, resume
that repeats exactly, optimiser state restored with Adam's step counters on the CPU. No Ray."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch.overrides import TorchFunctionMode

from vaedist.config import ModelConfig, TrainConfig
from vaedist.devices import CudaUnavailableError, require_cuda
from vaedist.engine import load_optimizer_state, make_optimizer, optimizer_kernel, train_epoch
from vaedist.model import VAE

# Tensor methods that read a value back to the host (a sync on a GPU) when called on a device tensor.
SYNCING = {"item", "__float__", "__int__", "__bool__", "tolist", "cpu", "numpy", "__index__"}


class SyncCounter(TorchFunctionMode):
    """Counts host reads of tensors, except those of `ignore` (Adam's step counters, which torch keeps
    on the CPU by design: reading them is no device sync)."""

    def __init__(self, ignore: set[int]):
        super().__init__()
        self.ignore, self.calls = ignore, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCING and args and isinstance(args[0], torch.Tensor) and id(args[0]) not in self.ignore:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def setup(seed: int = 0, **train):
    torch.manual_seed(seed)
    cfg = TrainConfig(batch_size_per_worker=16, lr=1e-3, lr_schedule="constant", **train)
    model = VAE(ModelConfig(latent_dim=4, hidden_dims=[32]))
    optimizer = make_optimizer(model, cfg)
    images = torch.randint(0, 256, (256, 784), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    return cfg, model, optimizer, images


def run_epoch(cfg, model, optimizer, images, epoch: int, rank: int = 0, steps: int = 4) -> dict:
    return train_epoch(model, optimizer, images, cfg, epoch=epoch, rank=rank, num_steps=steps, steps_per_epoch=steps,
                       start_step=epoch * steps, device=torch.device("cpu"))


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("kernel", ["foreach", "fused"])
def test_an_epoch_reads_the_device_once_however_many_steps(kernel):
    counts = {}
    for steps in (2, 8):
        cfg, model, optimizer, images = setup(optimizer_kernel=kernel)
        run_epoch(cfg, model, optimizer, images, 0, steps=1)  # creates Adam's state
        steps_ids = {id(s["step"]) for s in optimizer.state.values()}
        with SyncCounter(steps_ids) as counter:
            run_epoch(cfg, model, optimizer, images, 1, steps=steps)
        counts[steps] = counter.calls
    assert counts[2] == counts[8], counts  # nothing per step
    assert len(counts[8]) <= 1, counts     # the epoch's sums, read once


def test_progress_every_n_steps_reads_once_per_n():
    cfg, model, optimizer, images = setup(progress_every_steps=2)
    seen = []
    with SyncCounter(set()) as counter:
        train_epoch(model, optimizer, images, cfg, epoch=0, rank=0, num_steps=8, steps_per_epoch=8, start_step=0,
                    device=torch.device("cpu"), on_progress=lambda step, sums: seen.append((step, sums["count"])))
    assert seen == [(2, 32.0), (4, 64.0), (6, 96.0), (8, 128.0)]
    assert counter.calls.count("tolist") == 5  # four progress reads and the epoch's


def test_ranks_draw_different_noise_and_a_rank_repeats_its_own():
    cfg, model, optimizer, images = setup()
    start = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    results = {}
    for rank in (0, 1, 0):
        model.load_state_dict(start[0])
        optimizer.load_state_dict(start[1])
        run_epoch(cfg, model, optimizer, images, epoch=3, rank=rank)
        results.setdefault(rank, []).append(flat(model).clone())
    assert torch.equal(results[0][0], results[0][1])  # the same (seed, epoch, rank): the same draws
    assert not torch.allclose(results[0][0], results[1][0])


def test_a_resumed_epoch_repeats_what_an_uninterrupted_run_did():
    cfg, model, optimizer, images = setup()
    run_epoch(cfg, model, optimizer, images, 0)
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    run_epoch(cfg, model, optimizer, images, 1)
    uninterrupted = flat(model).clone()

    # A fresh process: new model and optimiser, the checkpoint restored, epoch 1 run again.
    cfg2, model2, optimizer2, _ = setup(seed=123)  # other initial weights, overwritten by the checkpoint
    model2.load_state_dict(saved[0])
    load_optimizer_state(optimizer2, saved[1])
    run_epoch(cfg2, model2, optimizer2, images, 1)
    assert torch.equal(flat(model2), uninterrupted)


def test_adam_step_counters_stay_on_the_cpu_when_restored(tmp_path):
    """Through a real checkpoint file, as a resuming worker loads it (tests/gpu repeats this with the
    parameters on a GPU, where a counter on the device would cost a sync per parameter per step)."""
    from vaedist.checkpoint import load_checkpoint, save_checkpoint
    from vaedist.config import Config

    cfg, model, optimizer, images = setup()
    run_epoch(cfg, model, optimizer, images, 0)
    save_checkpoint(str(tmp_path), model_state=model.state_dict(), optimizer_state=optimizer.state_dict(), epoch=0,
                    global_step=4, config=Config(), manifest_hash="x", history=[])
    fresh = make_optimizer(model, cfg)
    load_optimizer_state(fresh, load_checkpoint(str(tmp_path)).optimizer)
    steps = [s["step"] for s in fresh.state.values()]
    assert steps and all(t.device.type == "cpu" and float(t) == 4 for t in steps)
    assert all(s["exp_avg"].device == p.device for p, s in zip(model.parameters(), fresh.state.values()))


def test_a_resume_keeps_the_configured_kernel_not_the_checkpoints():
    """A checkpoint of a fused run (a GPU's default) restored under foreach stays foreach, its step
    counters on the CPU: torch's load_state_dict alone would take fused from the checkpoint (what the
    GPU test tier caught on an H200). And the other way round."""
    cfg, model, optimizer, images = setup()
    fused = make_optimizer(model, TrainConfig(optimizer_kernel="fused"))
    run_epoch(cfg, model, fused, images, 0)
    saved = copy.deepcopy(fused.state_dict())
    assert saved["param_groups"][0]["fused"] is True
    foreach = make_optimizer(model, TrainConfig(optimizer_kernel="foreach"))
    load_optimizer_state(foreach, copy.deepcopy(saved))
    assert all(g["foreach"] and not g["fused"] for g in foreach.param_groups)
    assert all(s["step"].device.type == "cpu" and float(s["step"]) == 4 for s in foreach.state.values())
    back = make_optimizer(model, TrainConfig(optimizer_kernel="fused"))
    load_optimizer_state(back, foreach.state_dict())
    assert all(g["fused"] and not g["foreach"] for g in back.param_groups)
    # The state itself is the checkpoint's, whichever kernel runs it.
    assert all(torch.equal(a["exp_avg"], b["exp_avg"]) for a, b in zip(saved["state"].values(), back.state.values()))


def test_optimizer_kernel_auto_is_fused_on_cuda_only():
    cfg = TrainConfig()
    assert optimizer_kernel(cfg, torch.device("cpu")) == "foreach"
    assert optimizer_kernel(cfg, torch.device("cuda")) == "fused"
    assert optimizer_kernel(TrainConfig(optimizer_kernel="fused"), torch.device("cpu")) == "fused"
    model = VAE(ModelConfig(latent_dim=2, hidden_dims=[8]))
    assert make_optimizer(model, TrainConfig(optimizer_kernel="fused")).defaults["fused"] is True


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA works here: nothing to refuse")
def test_asking_for_a_gpu_where_cuda_is_unusable_says_why():
    with pytest.raises(CudaUnavailableError, match=r"an encode actor \(encode.use_gpu\) asked for a GPU, but CUDA is "
                                                    rf"not usable: torch {re.escape(torch.__version__)} .*set the "
                                                    r"use_gpu key"):
        require_cuda("an encode actor (encode.use_gpu)")
    from vaedist.encode import LatentEncoder

    with pytest.raises(CudaUnavailableError, match="encode actor"):
        LatentEncoder(checkpoints=["/nonexistent"], shards_dir="/nonexistent", dataset={}, batch_size=1,
                      num_samples_mc=1, num_samples_iw=0, iw_chunk_size=1, seed=0, use_gpu=True, num_threads=1,
                      lineage={})
