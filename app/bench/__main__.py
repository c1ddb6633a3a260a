"""``python -m app.bench {layer,memory,fidelity,peaks,profile,trace} [options]``: benchmarks that print numbers."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "layer": ("app.bench.layer", "one 3D convolution: exact vs stochastic (memory, time, dW error)"),
    "memory": ("app.bench.memory", "whole U-Nets: peak memory/time per variant (exact, amp, ckpt, stochastic, lean)"),
    "fidelity": ("app.bench.fidelity", "per-layer dW error of the estimators vs SGD noise on a model state (table + PNG)"),
    "peaks": ("app.bench.peaks", "one convolution's forward/backward memory peak in multiples of its input, and time (exact vs sketches)"),
    "trace": ("app.bench.trace", "every byte alive at a training step's memory peak, by category and source (table + PNG)"),
    "profile": ("app.bench.profile", "per layer: host vs device time and kernel launches, converted vs plain, fwd and bwd"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m app.bench COMMAND [options]\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:10s} {text}")
        print("\n`python -m app.bench COMMAND --help` for a command's options.")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
