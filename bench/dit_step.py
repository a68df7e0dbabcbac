"""Training-step time, images/s and model FLOP utilisation of registered DiT / DiT-DH configs.

On a CPU it times the small configs and prints the FLOP counts of the paper-size ones; on a
GPU it times DiTDH-XL (and any --models) in bf16, eager and compiled, with peak memory.

    .venv/bin/python bench/dit_step.py [--models DiT-tiny DiTDH-tiny] [--batch 128] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from rae_core.models import build_model, count_params, model_flops_per_image
from rae_core.transport import Transport

GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s


def latent_for(name: str) -> tuple[int, int, int]:
    small = "tiny" in name or "micro" in name
    return (64, 4, 10) if small else (768, 16, 1000)


def time_steps(name: str, batch: int, steps: int, device: str, bf16: bool,
               compile_model: bool, profile: bool = False) -> dict:
    c, g, k = latent_for(name)
    torch.manual_seed(0)
    model = build_model(name, c, g, k).to(device)
    net = torch.compile(model) if compile_model else model
    # fused AdamW: one kernel for all parameters on the GPU (the foreach default on the CPU)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                            fused=device.startswith("cuda"))
    tr = Transport(shift=(g * g * c / 4096) ** 0.5)
    x = torch.randn(batch, c, g, g, device=device)
    y = torch.randint(0, k, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            loss = tr.loss(net, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    if profile and device.startswith("cuda"):
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30,
                                        max_name_column_width=80))
    flops = 3 * model_flops_per_image(name, c, g) * batch  # forward + backward ~ 3x forward
    out = {"model": name, "params_M": round(count_params(name, c, g, k) / 1e6, 2),
           "batch": batch, "device": device, "bf16": bf16, "compiled": compile_model,
           "step_ms_median": round(med * 1e3, 2), "images_per_s": round(batch / med, 1),
           "train_gflop_per_step": round(flops / 1e9, 2),
           "achieved_tflops": round(flops / med / 1e12, 4)}
    if device.startswith("cuda"):
        out["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        gpu = torch.cuda.get_device_name()
        peak = next((v for k_, v in GPU_PEAK_BF16.items() if k_ in gpu), None)
        if peak:
            out["mfu"] = round(flops / med / peak, 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+")
    p.add_argument("--batch", type=int)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--modes", nargs="+", choices=["eager", "compiled"],
                   default=["eager", "compiled"], help="GPU only")
    p.add_argument("--profile", action="store_true", help="GPU only: print the top kernels")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        models = args.models or ["DiTDH-XL"]
        for name in models:
            for compiled in (m == "compiled" for m in args.modes):
                print(json.dumps(time_steps(name, args.batch or 256, args.repeat, "cuda",
                                            True, compiled, args.profile)))
        return
    torch.set_num_threads(torch.get_num_threads())
    for name in args.models or ["DiT-micro", "DiTDH-micro", "DiT-tiny", "DiTDH-tiny"]:
        print(json.dumps(time_steps(name, args.batch or 128, args.repeat, "cpu", False, False)))
    for name in ("DiT-XL", "DiTDH-S", "DiTDH-XL"):
        c, g, k = latent_for(name)
        fwd = model_flops_per_image(name, c, g)
        print(json.dumps({"model": name, "params_M": round(count_params(name, c, g, k) / 1e6, 1),
                          "forward_gflop_per_image": round(fwd / 1e9, 1),
                          "train_tflop_per_image": round(3 * fwd / 1e12, 3)}))


if __name__ == "__main__":
    main()
