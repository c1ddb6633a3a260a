"""scripts/bench_video.py: the longest-clip search and one CPU row per variant."""

from __future__ import annotations

import pytest

from tests.helpers import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_video")


@pytest.mark.parametrize("largest", [0, 16, 48, 112, 128, 400, 2048])
def test_longest_finds_the_largest_fitting_multiple(bench, largest):
    asked = []

    def fits(frames):
        asked.append(frames)
        return frames <= largest

    assert bench.longest(fits, 16, 2048) == largest
    assert all(f % 16 == 0 for f in asked) and len(asked) <= 2 * (2048).bit_length()


def test_cpu_rows_per_variant(bench, capsys, one_thread):
    assert bench.main(["--device", "cpu", "--frames", "8", "--size", "16", "--variants", "exact", "stochastic+lean",
                       "--warmup", "0", "--repeat", "1"]) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| 8x16x16")]
    assert [r.split("|")[2].strip() for r in rows] == ["exact", "stochastic+lean"]
    saved = [float(r.split("|")[5]) for r in rows]
    assert saved[1] < saved[0]  # the sketch and lean layers keep fewer bytes than exact backprop
