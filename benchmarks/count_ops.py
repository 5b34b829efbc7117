"""Operations per training step: why a step of the default MLP costs the same ~3.6 ms on an H200 at
any batch from 128 to 8,192 (README, "GPU (H200)"). Counts the top-level ATen operations (each one a
kernel launch or more on a GPU) of engine.train_steps with torch.profiler, on the CPU, for the
model of configs/mnist.yaml and each Adam kernel (fp32: autocast to bf16 does nothing on a CPU, so
its casts would need a GPU to count). The profiler's own USDT lines print too.

    python benchmarks/count_ops.py
"""
import collections

import torch
from torch.profiler import ProfilerActivity, profile

from vaedist.config import ModelConfig, TrainConfig
from vaedist.engine import make_optimizer, train_steps
from vaedist.model import VAE

STEPS = 10

torch.set_num_threads(1)
for kernel in ("foreach", "fused"):
    torch.manual_seed(0)
    cfg = TrainConfig(batch_size_per_worker=2, lr=1e-3, lr_schedule="constant", optimizer_kernel=kernel)
    model = VAE(ModelConfig(latent_dim=50, hidden_dims=[512, 512], activation="elu"))
    optimizer = make_optimizer(model, cfg)
    images = torch.randint(0, 256, (4096, 784), dtype=torch.uint8)
    kwargs = dict(epoch=0, rank=0, steps_per_epoch=STEPS, start_step=0, device=torch.device("cpu"))
    train_steps(model, optimizer, images, cfg, num_steps=2, **kwargs)  # Adam's state exists
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_steps(model, optimizer, images, cfg, num_steps=STEPS, **kwargs)
    # Top level: not called from inside another ATen operation (the backward's run under autograd's
    # nodes, so they count too).
    top = [e for e in prof.events() if e.name.startswith("aten::")
           and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]
    common = collections.Counter(e.name for e in top).most_common(6)
    print(f"adam {kernel:7s} : {len(top) / STEPS:.0f} top-level ATen ops per step; "
          f"most: {', '.join(f'{n[6:]} {c / STEPS:g}' for n, c in common)}")
