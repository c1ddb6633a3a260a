"""Data: datasets on disk, checks, synthetic data, MONAI transforms and loaders.

Public API::

    datalist = load_datalist("/data/Task01_BrainTumour")          # checks every pair first
    pre = Preprocessing(spacing=(1.0, 1.0, 1.0), in_channels=datalist.n_channels)
    prepared = prepare_datalist(datalist, pre, datalist.n_classes)   # preprocess once, stored on disk
    train_loader, val_loader = build_loaders(datalist, pre, (96, 96, 96), datalist.n_classes,
                                             num_workers="auto", prepared=prepared)

    clip = open_clip("recording.mp4")                               # or a folder of numbered frames
    window = clip.read(start=120, count=16, stride=2)               # (C, 16, H, W) float32 in [0, 1]
    masks = read_mask_clip("masks/", clip.n_frames, clip.height, clip.width)   # (T, H, W) int64
"""

from app.data.datalist import DataList, load_datalist
from app.data.degrade import Degradation
from app.data.errors import DataError
from app.data.loaders import build_loaders, default_cache_dir, prepare_datalist, resolve_num_workers, shutdown_workers
from app.data.patches import Augmentation, PatchDataset, SeededSampler, VolumeDataset
from app.data.preprocess import CaseStore, PreparedCases, PreprocessedCase, prepare_cases, preprocess_case
from app.data.nifti import save_like
from app.data.scan import scan_cases
from app.data.synthetic import make_mni_dataset, make_synthetic_dataset
from app.data.transforms import Preprocessing, infer_transforms, train_transforms, val_transforms
from app.data.video import (
    ClipSource,
    make_synthetic_video_dataset,
    open_clip,
    read_mask_clip,
    read_video_volume,
    write_video,
)

__all__ = [
    "Augmentation",
    "CaseStore",
    "ClipSource",
    "DataError",
    "Degradation",
    "DataList",
    "PatchDataset",
    "PreparedCases",
    "PreprocessedCase",
    "Preprocessing",
    "SeededSampler",
    "VolumeDataset",
    "build_loaders",
    "default_cache_dir",
    "infer_transforms",
    "load_datalist",
    "make_mni_dataset",
    "make_synthetic_dataset",
    "make_synthetic_video_dataset",
    "open_clip",
    "prepare_cases",
    "prepare_datalist",
    "preprocess_case",
    "read_mask_clip",
    "read_video_volume",
    "resolve_num_workers",
    "save_like",
    "scan_cases",
    "shutdown_workers",
    "train_transforms",
    "val_transforms",
    "write_video",
]
