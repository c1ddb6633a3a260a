"""Where one stochastic convolution's (or the default network's) forward+backward spends its time.

    python scripts/profile_layer.py --edge 256 --channels 32 --sketch spectral --n-probes 256 [--amp]
    python scripts/profile_layer.py --network --edge 128   # whole default DynUNet, stochastic+lean
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import app.nn as snn
from app.utils import resolve_device


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--edge", type=int, default=128)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--sketch", default=snn.DEFAULT_SKETCH)
    p.add_argument("--n-probes", type=int, default=snn.DEFAULT_N_PROBES)
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--amp", action="store_true")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--network", action="store_true", help="profile the default DynUNet (stochastic+lean) instead")
    p.add_argument("--sort", default="self_cuda_time_total")
    args = p.parse_args()
    dev = resolve_device("auto")
    c = args.channels
    if args.network:
        from app.models import build_model, resolve_model_config

        cfg = resolve_model_config({"name": "dynunet", "in_channels": 1, "out_channels": 3, "spacing": [1.0, 1.0, 1.0],
                                    "patch_size": [args.edge] * 3})
        layer = snn.convert(build_model(cfg), args.n_probes, sketch=args.sketch, lean=True).to(dev).train()
        x = torch.randn(1, 1, args.edge, args.edge, args.edge, device=dev)
    else:
        layer = snn.StochasticConv3d(c, c, 3, padding=1, stride=args.stride, n_probes=args.n_probes, sketch=args.sketch).to(dev)
        x = torch.randn(1, c, args.edge, args.edge, args.edge, device=dev).relu_().requires_grad_()

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.amp):
            y = layer(x)
        y.float().square().mean().backward()

    for _ in range(2):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    key = args.sort if dev.type == "cuda" else "self_cpu_time_total"
    print(f"{args.sketch} r{args.n_probes} edge {args.edge} C {c} stride {args.stride} amp {args.amp} (3 steps)")
    print(prof.key_averages().table(sort_by=key, row_limit=args.top, max_name_column_width=60))


if __name__ == "__main__":
    main()
