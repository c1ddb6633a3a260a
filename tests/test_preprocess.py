"""Preprocess once: cache keys, interrupted and damaged entries, patch sampling, num_workers=auto,
the same batches and training results with and without the cache (CPU, tiny volumes)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import app.data.preprocess as preprocess_module
from app.data import (
    Augmentation,
    CaseStore,
    DataError,
    Preprocessing,
    SeededSampler,
    build_loaders,
    load_datalist,
    make_synthetic_dataset,
    make_synthetic_video_dataset,
    prepare_cases,
    prepare_datalist,
    preprocess_case,
    resolve_num_workers,
    val_transforms,
)
from app.data.loaders import MAX_AUTO_WORKERS
from app.data.patches import crop_patch, patch_corner

SHAPE = (20, 22, 18)
PRE = Preprocessing(spacing=(1.3, 1.3, 1.3))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("pre") / "ds", n_train=3, n_val=1, shape=SHAPE, seed=2)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The images :func:`preprocess_case` is run on during the test."""
    seen: list[str] = []
    original = preprocess_module.preprocess_case

    def counting(item, *args, **kwargs):
        seen.append(Path(item["image"]).name)
        return original(item, *args, **kwargs)

    monkeypatch.setattr(preprocess_module, "preprocess_case", counting)
    return seen


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for sub in ("imagesTr", "labelsTr"):
        (dst / sub).mkdir()
        for f in (src / sub).iterdir():
            (dst / sub / f.name).write_bytes(f.read_bytes())
    (dst / "dataset.json").write_text((src / "dataset.json").read_text())
    return dst


# ------------------------------------------------------------------------------ the stored arrays


def test_preprocessed_arrays_equal_the_validation_transforms(dataset: Path) -> None:
    item = load_datalist(dataset).train[0]
    reference = val_transforms(PRE)(item)
    for check in (True, False):
        case = preprocess_case(item, PRE, 3, check=check)
        np.testing.assert_array_equal(case.image, reference["image"].numpy())
        np.testing.assert_array_equal(case.label, reference["label"].numpy())
        assert case.image.dtype == np.float32 and case.label.dtype == np.uint8
        for cls, locs in enumerate(case.locations, start=1):  # every stored location holds its class
            assert len(locs) and (case.label[0][tuple(locs.T)] == cls).all()


def test_disk_entries_are_memory_mapped_and_equal_the_memory_ones(dataset: Path, tmp_path: Path) -> None:
    items = load_datalist(dataset).train
    disk = prepare_cases(items, PRE, 3, "disk", tmp_path / "c", progress=False)
    memory = prepare_cases(items, PRE, 3, "memory", progress=False)
    for i in range(len(items)):
        a, b = disk.case(i), memory.case(i)
        assert isinstance(a.image, np.memmap) and not isinstance(b.image, np.memmap)
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.label, b.label)
        assert all(np.array_equal(x, y) for x, y in zip(a.locations, b.locations))
    assert sorted(p.name.split(".", 1)[1] for p in (tmp_path / "c").glob(f"{disk.keys[0]}*")) == [
        "image.npy", "json", "label.npy", "locations.npy"]


# ------------------------------------------------------------------------------ cache keys


def test_key_follows_the_file_bytes_and_the_settings(dataset: Path, tmp_path: Path, counted: list[str]) -> None:
    root = _copy(dataset, tmp_path / "ds")
    items = load_datalist(root).train
    cache = tmp_path / "cache"
    first = prepare_cases(items, PRE, 3, "disk", cache, progress=False)
    assert len(counted) == 3
    again = prepare_cases(items, PRE, 3, "disk", cache, progress=False)
    assert len(counted) == 3 and again.keys == first.keys  # nothing recomputed

    # the same bytes under a new name and a new time stamp: still found
    os.utime(items[0]["image"], ns=(1, 1))
    prepare_cases(items, PRE, 3, "disk", cache, progress=False)
    assert len(counted) == 3

    # one image changed: that case alone is redone, and its new arrays are read
    path = Path(items[1]["image"])
    img = nib.load(path)
    data = np.asanyarray(img.dataobj).copy()
    data[5:9, 5:9, 5:9] += 3.0
    nib.save(nib.Nifti1Image(data, img.affine, img.header), path)
    changed = prepare_cases(items, PRE, 3, "disk", cache, progress=False)
    assert counted[3:] == [path.name]
    assert changed.keys[0] == first.keys[0] and changed.keys[1] != first.keys[1]
    np.testing.assert_array_equal(changed.case(1).image, preprocess_case(items[1], PRE, check=False).image)

    # a changed setting: every case is redone under new keys
    other = Preprocessing(spacing=(1.0, 1.0, 1.0))
    redone = prepare_cases(items, other, 3, "disk", cache, progress=False)
    assert len(counted) == 4 + 3 and not set(redone.keys) & set(changed.keys)
    assert redone.case(0).shape != changed.case(0).shape


def test_interrupted_preprocessing_leaves_no_entry(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write stopped after the image file: no entry, no temporary file; the next run completes it."""
    items = load_datalist(dataset).train[:1]
    cache = tmp_path / "cache"
    original_save = np.save
    calls = {"n": 0}

    def save_then_stop(file, array, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the label file
            original_save(file, array[..., : array.shape[-1] // 2])  # half of it reached the disk
            raise KeyboardInterrupt
        return original_save(file, array, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(np, "save", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            prepare_cases(items, PRE, 3, "disk", cache, threads=1, progress=False)
    assert not list(cache.glob("*.json")) and not list(cache.glob(".*"))  # no entry, no temporary left
    assert [p.name.split(".", 1)[1] for p in cache.iterdir()] == ["image.npy"]

    (cache / ".0123.label.npy.abc.npy").write_bytes(b"half")  # what a kill (no clean-up) leaves
    done = prepare_cases(items, PRE, 3, "disk", cache, progress=False)
    assert not list(cache.glob(".*"))
    np.testing.assert_array_equal(done.case(0).label, preprocess_case(items[0], PRE, check=False).label)


def test_damaged_entry_is_redone(dataset: Path, tmp_path: Path, counted: list[str], caplog: pytest.LogCaptureFixture) -> None:
    items = load_datalist(dataset).train[:1]
    cache = tmp_path / "cache"
    key = prepare_cases(items, PRE, 3, "disk", cache, progress=False).keys[0]
    CaseStore(cache).paths(key)["label"].unlink()
    again = prepare_cases(items, PRE, 3, "disk", cache, progress=False)
    assert len(counted) == 2 and "damaged cache entry" in caplog.text
    assert again.case(0).label.shape == again.case(0).image.shape


def test_stored_label_range_is_checked_against_the_classes(dataset: Path, tmp_path: Path) -> None:
    dl = load_datalist(dataset)
    prepare_cases(dl.train, PRE, 3, "disk", tmp_path / "c", progress=False)
    with pytest.raises(DataError, match=r"label values span 0\.\.2, outside 0\.\.1") as info:
        prepare_cases(dl.train, PRE, 2, "disk", tmp_path / "c", progress=False)  # found stored, still checked
    assert str(info.value).startswith(dl.train[0]["label"])


def test_video_clips_are_decoded_once(tmp_path: Path, counted: list[str]) -> None:
    root = make_synthetic_video_dataset(tmp_path / "vid", n_train=2, n_val=1, shape=(10, 20, 22))
    dl = load_datalist(root)
    pre = Preprocessing(crop_foreground=False)
    train, val = prepare_datalist(dl, pre, 3, "disk", tmp_path / "cache", progress=False)
    assert len(counted) == 3
    prepare_datalist(dl, pre, 3, "disk", tmp_path / "cache", progress=False)
    assert len(counted) == 3
    np.testing.assert_array_equal(train.case(0).image, val_transforms(pre)(dl.train[0])["image"].numpy())
    assert train.case(0).shape == (10, 20, 22)


# ------------------------------------------------------------------------------ patches


def test_foreground_oversampling(dataset: Path) -> None:
    case = prepare_cases(load_datalist(dataset).train[:1], PRE, 3, "memory", progress=False).case(0)
    patch = (6, 6, 6)
    rng = np.random.default_rng(0)
    for share, expect in ((1.0, 1.0), (0.0, None)):
        centres = []
        for _ in range(200):
            corner = patch_corner(case, patch, rng, share)
            centres.append(crop_patch(case.label, corner, patch)[0, 3, 3, 3] > 0)
        if expect is not None:
            assert np.mean(centres) == expect
        else:
            assert np.mean(centres) < 0.9
    corner = np.array([-2, 15, 3])  # outside the volume: zero padded
    cut = crop_patch(case.image, corner, (4, 4, 4))
    assert cut.shape == (1, 4, 4, 4) and (cut[:, :2] == 0).all()


def test_seeded_sampler_shards_like_torch_and_seeds_by_position() -> None:
    whole = SeededSampler(7, seed=3)
    whole.set_epoch(2)
    items = list(whole)
    assert sorted(i for i, _ in items) == list(range(7)) and len({s for _, s in items}) == 7
    shards = []
    for rank in range(2):
        s = SeededSampler(7, seed=3, num_replicas=2, rank=rank)
        s.set_epoch(2)
        shards.append(list(s))
    torch_shard = torch.utils.data.DistributedSampler(range(7), num_replicas=2, rank=1, seed=3)
    torch_shard.set_epoch(2)
    assert [i for i, _ in shards[1]] == list(torch_shard)
    assert {i for i, _ in shards[0] + shards[1]} == set(range(7))
    whole.set_epoch(3)
    assert list(whole) != items


def _pass_batches(sampler: SeededSampler, epoch: int, size: int) -> list[list]:
    sampler.set_epoch(epoch)
    return list(torch.utils.data.BatchSampler(sampler, size, drop_last=False))


@pytest.mark.parametrize("per_epoch", [None, 2, 7])
def test_epoch_batches_stream_the_batches_of_restarted_loaders(per_epoch) -> None:
    """An endless :class:`EpochBatches` yields, epoch after epoch, what restarting the sampler at every
    pass gives: the epoch's pass (short last batch included), then RESTART_STRIDE-shifted passes
    until ``per_epoch`` batches; one pass per epoch without ``per_epoch``."""
    from app.data.patches import RESTART_STRIDE, EpochBatches

    sampler = SeededSampler(5, seed=3)  # 5 items in batches of 2: 3 batches per pass
    expected = []
    for epoch in (4, 5, 6):
        batches, restart = [], 0
        while True:
            batches += _pass_batches(sampler, epoch + RESTART_STRIDE * restart, 2)
            restart += 1
            if per_epoch is None or len(batches) >= per_epoch:
                break
        expected += batches[:per_epoch] if per_epoch else batches
    stream = EpochBatches(SeededSampler(5, seed=3), 2, per_epoch=per_epoch, endless=True)
    stream.set_epoch(4)
    got = [b for b, _ in zip(stream, range(len(expected)))]
    assert got == expected and len(stream) == 3
    assert [len(b) for b in got[:3]] == ([2, 2, 2] if per_epoch == 2 else [2, 2, 1])  # 2: the next epoch's first
    one = EpochBatches(SeededSampler(5, seed=3), 2, per_epoch=per_epoch)
    one.set_epoch(5)
    assert list(one) == expected[len(expected) // 3: 2 * len(expected) // 3]  # not endless: one epoch


def test_device_augmentation_equals_worker_augmentation_on_the_cpu() -> None:
    aug = Augmentation(plane=(0, 1))
    image = torch.randn(3, 2, 8, 8, 6)
    label = torch.randint(0, 3, (3, 1, 8, 8, 6)).float()
    seeds = torch.tensor([5, 6, 7])
    batch_image, batch_label = aug.batch(image, label, seeds)
    for b in range(3):
        one_image, one_label = aug(image[b], label[b], int(seeds[b]))
        assert torch.equal(batch_image[b], one_image) and torch.equal(batch_label[b], one_label)
    assert not torch.equal(batch_image, image)


# ------------------------------------------------------------------------------ loaders


def test_num_workers_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_num_workers("auto", "cuda") == min(15, MAX_AUTO_WORKERS)
    assert resolve_num_workers("auto", "cpu") == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: the cores are shared by the node's processes
    assert resolve_num_workers("auto", "cuda") == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert resolve_num_workers("auto", "cuda") == 1 and resolve_num_workers("auto", "cpu") == 0
    assert resolve_num_workers(3) == 3 and resolve_num_workers("2") == 2
    for bad in (-1, "many", True):
        with pytest.raises(ValueError, match="num_workers must be auto or an integer >= 0"):
            resolve_num_workers(bad)


def test_batches_are_the_same_for_every_cache_mode_and_worker_count(dataset: Path, tmp_path: Path) -> None:
    dl = load_datalist(dataset)
    runs = {}
    for cache, workers in (("disk", 0), ("disk", 1), ("memory", 0), ("none", 1)):
        train, val = build_loaders(dl, PRE, (8, 8, 6), 3, batch_size=2, num_workers=workers, cache=cache,
                                   cache_dir=tmp_path / "c", num_samples=2, seed=4, device_type="cpu")
        assert train.persistent_workers == (workers > 0)
        batches = []
        for epoch in (0, 1):
            train.batch_sampler.set_epoch(epoch)
            batches += list(train)
        runs[(cache, workers)] = (batches, next(iter(val)))
    (ref, ref_val) = runs[("disk", 0)]
    assert tuple(ref[0]["image"].shape) == (4, 1, 8, 8, 6) and len(ref) == 4
    assert not torch.equal(ref[0]["image"], ref[2]["image"])  # epochs differ
    for key, (batches, val) in runs.items():
        for a, b in zip(ref, batches):
            for k in ("image", "label", "seed"):
                assert torch.equal(a[k], b[k]), (key, k)
        assert torch.equal(val["image"], ref_val["image"]) and torch.equal(val["label"], ref_val["label"])


def test_training_results_are_identical_with_and_without_the_cache(dataset: Path, tmp_path: Path) -> None:
    from app.models import load_checkpoint
    from app.train import train
    from test_train import tiny_cfg

    states = {}
    for cache in ("none", "disk"):
        out = tmp_path / cache
        train(tiny_cfg(out, None, "data=folder", f"data.root={dataset}", f"data.cache={cache}",
                       f"data.cache_dir={tmp_path / 'cache'}", "trainer.max_epochs=1",
                       "data.preprocessing.spacing=[1.3,1.3,1.3]", "logger.fidelity_every=0"))
        states[cache] = load_checkpoint(out / "checkpoints" / "last.pt")
    assert states["none"]["global_step"] == states["disk"]["global_step"] == 2
    for key, value in states["none"]["model_state"].items():
        torch.testing.assert_close(states["disk"]["model_state"][key], value, rtol=0, atol=0, msg=key)
    assert states["none"]["history"][0]["val/mean_dice"] == states["disk"]["history"][0]["val/mean_dice"]
    assert len(list((tmp_path / "cache").glob("*.json"))) == 4
    assert json.loads(next((tmp_path / "cache").glob("*.json")).read_text())["version"] == preprocess_module.PREPROCESS_VERSION


def test_training_with_augmentation_on_the_device(dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import math

    from app.train import train
    from test_train import tiny_cfg

    with caplog.at_level("INFO", logger="app.train.loop"):
        metrics = train(tiny_cfg(tmp_path / "run", None, "data=folder", f"data.root={dataset}", "data.augment_on=device",
                                 f"data.cache_dir={tmp_path / 'cache'}", "trainer.max_epochs=1", "logger.fidelity_every=0",
                                 "trainer.num_workers=auto"))
    assert math.isfinite(metrics["train/epoch_loss"]) and metrics["global_step"] == 2
    assert "augmentation on the device" in caplog.text and "(trainer.num_workers=auto)" in caplog.text
