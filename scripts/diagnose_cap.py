"""Why does a step that peaks at P GiB uncapped run out of memory under a larger cap?

Runs one training step of the default network per (variant, edge), uncapped and then under
``--cap-gib``, and prints the measured peak, the reserved memory and, on out-of-memory, the
allocator's own message (what it tried to allocate, what was reserved but unallocated).

    python scripts/diagnose_cap.py --edges 160 --variants exact --cap-gib 24
"""

from __future__ import annotations

import argparse
import os

import torch

from app.plan.measure import GIB, measure_step


def _report_leaks() -> None:
    """Lists the CUDA tensors still alive (largest first) and what refers to them."""
    import gc

    gc.collect()
    alive = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.is_cuda]
    alive.sort(key=lambda t: -t.untyped_storage().nbytes())
    for t in alive[:6]:
        refs = [type(r).__name__ + (f":{r.f_code.co_name}" if hasattr(r, "f_code") else "") for r in gc.get_referrers(t)][:6]
        print(f"  alive {tuple(t.shape)} {t.dtype} {t.untyped_storage().nbytes() / GIB:.2f} GiB <- {refs}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--edges", type=int, nargs="+", default=[160])
    p.add_argument("--variants", nargs="+", default=["exact"])
    p.add_argument("--cap-gib", type=float, default=24.0)
    p.add_argument("--uncapped", action="store_true", help="also measure without the cap")
    p.add_argument("--search", action="store_true", help="run the planner's search (one process) and print every trial")
    args = p.parse_args()
    cfg = {"name": "dynunet", "in_channels": 1, "out_channels": 3, "spacing": [1.0, 1.0, 1.0]}
    print(f"PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '')!r} "
          f"CUDNN_CONV_WSCAP_DBG={os.environ.get('CUDNN_CONV_WSCAP_DBG', '')!r} cudnn.benchmark={torch.backends.cudnn.benchmark}")
    if args.search:
        from app.plan.planner import plan

        for variant in args.variants:
            def measure(patch: tuple[int, ...]):
                s = measure_step(cfg, patch_size=patch, variant=variant, device="cuda", warmup=1, repeat=1,
                                 memory_cap_gib=args.cap_gib, report_errors=True)
                print(f"after {patch[0]}^3 ({s.status}): {torch.cuda.memory_allocated() / GIB:.2f} GiB still allocated", flush=True)
                _report_leaks()
                return s

            r = plan(cfg, args.cap_gib, (1.0, 1.0, 1.0), variant, 1, "cuda", cache=False, max_edge=max(args.edges),
                     edge_step=32, warmup=1, repeat=1, measure_fn=measure)
            for t in r.trials:
                print(f"search {variant} {t.patch_size[0]}^3: {t.status} peak={t.peak_bytes / GIB:.2f} GiB {t.reason}", flush=True)
            print(f"search {variant}: largest {r.patch_size}", flush=True)
        return
    for variant in args.variants:
        for edge in args.edges:
            for cap in ([None] if args.uncapped else []) + [args.cap_gib]:
                s = measure_step(cfg, patch_size=(edge,) * 3, variant=variant, device="cuda", warmup=1, repeat=1,
                                 memory_cap_gib=cap, report_errors=True)
                print(f"{variant} {edge}^3 cap={cap}: {s.status} peak={s.peak_bytes / GIB:.2f} GiB "
                      f"step={s.step_seconds * 1e3:.0f} ms max_reserved={torch.cuda.max_memory_reserved() / GIB:.2f} GiB "
                      f"{s.reason}", flush=True)
                torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()
