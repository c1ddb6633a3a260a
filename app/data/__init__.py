"""Data: datasets on disk, checks, synthetic data, MONAI transforms and loaders.

Public API::

    datalist = load_datalist("/data/Task01_BrainTumour")          # checks every pair first
    pre = Preprocessing(spacing=(1.0, 1.0, 1.0), in_channels=datalist.n_channels)
    prepared = prepare_datalist(datalist, pre, datalist.n_classes)   # preprocess once, stored on disk
    train_loader, val_loader = build_loaders(datalist, pre, (96, 96, 96), datalist.n_classes,
                                             num_workers="auto", prepared=prepared)
"""

from app.data.datalist import DataList, load_datalist
from app.data.errors import DataError
from app.data.loaders import build_loaders, default_cache_dir, prepare_datalist, resolve_num_workers, shutdown_workers
from app.data.patches import Augmentation, PatchDataset, SeededSampler, VolumeDataset
from app.data.preprocess import CaseStore, PreparedCases, PreprocessedCase, prepare_cases, preprocess_case
from app.data.nifti import save_like
from app.data.scan import scan_cases
from app.data.synthetic import make_mni_dataset, make_synthetic_dataset
from app.data.transforms import Preprocessing, infer_transforms, train_transforms, val_transforms
from app.data.video import make_synthetic_video_dataset, read_video_volume

__all__ = [
    "Augmentation",
    "CaseStore",
    "DataError",
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
    "prepare_cases",
    "prepare_datalist",
    "preprocess_case",
    "read_video_volume",
    "resolve_num_workers",
    "save_like",
    "scan_cases",
    "shutdown_workers",
    "train_transforms",
    "val_transforms",
]
