"""The GPU tier (`pytest -m gpu`): training and encoding on CUDA, run wherever torch.cuda.is_available();
skipped cleanly elsewhere."""

from __future__ import annotations

import copy

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from vaedist.config import ModelConfig, TrainConfig, config_from_dict
from vaedist.engine import load_optimizer_state, make_grad_scaler, make_optimizer, train_epoch, train_steps
from vaedist.model import VAE

from conftest import debug_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.is_available() is false)")]


def cuda_setup(**train):
    torch.manual_seed(0)
    device = torch.device("cuda")
    cfg = TrainConfig(batch_size_per_worker=256, lr=1e-3, lr_schedule="constant", **train)
    model = VAE(ModelConfig(latent_dim=16, hidden_dims=[256])).to(device)
    optimizer = make_optimizer(model, cfg, device)
    images = torch.randint(0, 256, (4096, 784), dtype=torch.uint8, device=device)
    return cfg, model, optimizer, images, device


@pytest.mark.parametrize("step_mode", ["eager", "cuda_graph"])
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_a_training_epoch_on_cuda_never_waits_for_the_host(precision, step_mode):
    cfg, model, optimizer, images, device = cuda_setup(mixed_precision=precision, step_mode=step_mode)
    kwargs = dict(epoch=0, rank=0, num_steps=8, steps_per_epoch=8, start_step=0, device=device,
                  mixed_precision=precision)
    train_steps(model, optimizer, images, cfg, **kwargs)  # warm-up: lazy CUDA state, Adam's state
    torch.cuda.synchronize()
    # Every step of an epoch, with sync debugging on: any host read raises. (fp16's GradScaler reads
    # its inf check every step, so it cannot pass this; the epoch's one read of its sums comes after.)
    torch.cuda.set_sync_debug_mode("error")
    try:
        totals, count = train_steps(model, optimizer, images, cfg, **{**kwargs, "epoch": 1})
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert count == 8 * 256 and torch.isfinite(totals).all()
    # And the check is live: a host read inside it does raise.
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):
            totals.tolist()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_fp16_with_a_grad_scaler_trains():
    cfg, model, optimizer, images, device = cuda_setup(mixed_precision="fp16")
    scaler = make_grad_scaler(device, "fp16")
    losses = [train_epoch(model, optimizer, images, cfg, epoch=e, rank=0, num_steps=16, steps_per_epoch=16,
                          start_step=16 * e, device=device, mixed_precision="fp16", scaler=scaler)["loss"]
              for e in range(3)]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_adam_step_counters_stay_on_the_cpu_after_a_resume_on_cuda(tmp_path):
    from vaedist.checkpoint import load_checkpoint, save_checkpoint
    from vaedist.config import Config

    cfg, model, optimizer, images, device = cuda_setup(step_mode="eager")  # the foreach kernel's counters
    train_epoch(model, optimizer, images, cfg, epoch=0, rank=0, num_steps=2, steps_per_epoch=2, start_step=0,
                device=device)
    save_checkpoint(str(tmp_path), model_state=model.state_dict(), optimizer_state=optimizer.state_dict(), epoch=0,
                    global_step=2, config=Config(), manifest_hash="x", history=[])
    state = load_checkpoint(str(tmp_path), map_location=device)  # the old, costly way of loading
    fresh = make_optimizer(model, TrainConfig(optimizer_kernel="foreach", step_mode="eager"), device)
    load_optimizer_state(fresh, copy.deepcopy(state.optimizer))
    assert all(s["step"].device.type == "cpu" for s in fresh.state.values())
    assert all(s["exp_avg"].device.type == "cuda" for s in fresh.state.values())


@pytest.mark.integration
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_debug_training_on_a_gpu_through_ray_train(small_shards, tmp_path, precision):
    from vaedist.cluster import init_ray
    from vaedist.train import train

    import ray

    ray.shutdown()
    init_ray(None)
    try:
        cfg = debug_config(small_shards, tmp_path, f"gpu-{precision}", "scaling.use_gpu=true",
                           f"train.mixed_precision={precision}", "train.epochs=2")
        result = train(cfg)
    finally:
        ray.shutdown()
    rows = result.epochs
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] and np.isfinite(rows[-1]["test_loss"])


@pytest.mark.integration
def test_encode_on_cuda_matches_a_cpu_encode(trained_run, tmp_path):
    from vaedist.encode import encode

    import ray

    cfg, result = trained_run
    base = ["encode.num_samples_mc=4", "encode.num_samples_iw=16", "encode.concurrency=1", "encode.cpus_per_actor=1"]
    cpu = encode(config_from_dict(cfg.to_dict(), base), checkpoint=result.latest_checkpoint, out=str(tmp_path / "cpu"))
    ray.shutdown()
    from vaedist.cluster import init_ray

    init_ray(None)
    try:
        gpu = encode(config_from_dict(cfg.to_dict(), base + ["encode.use_gpu=true"]),
                     checkpoint=result.latest_checkpoint, out=str(tmp_path / "gpu"))
    finally:
        ray.shutdown()
    a = pq.read_table(cpu.path).sort_by("key")
    b = pq.read_table(gpu.path).sort_by("key")
    assert a["key"].equals(b["key"])
    for col in ("mu", "logvar"):
        x = np.stack(a[col].to_numpy(zero_copy_only=False))
        y = np.stack(b[col].to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(x, y, atol=1e-4)
    for col in ("recon_nll", "kl", "loss", "log_px"):
        np.testing.assert_allclose(a[col].to_numpy(), b[col].to_numpy(), rtol=1e-4, atol=1e-3)
