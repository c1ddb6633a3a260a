"""Data: datasets on disk, checks, synthetic data, MONAI transforms and loaders.

Public API::

    datalist = load_datalist("/data/Task01_BrainTumour")          # checks every pair first
    pre = Preprocessing(spacing=(1.0, 1.0, 1.0), in_channels=datalist.n_channels)
    train_loader, val_loader = build_loaders(datalist, pre, (96, 96, 96), datalist.n_classes)
"""

from app.data.datalist import DataList, load_datalist
from app.data.errors import DataError
from app.data.loaders import build_loaders
from app.data.nifti import save_like
from app.data.scan import scan_cases
from app.data.synthetic import make_mni_dataset, make_synthetic_dataset
from app.data.transforms import Preprocessing, infer_transforms, train_transforms, val_transforms
from app.data.video import make_synthetic_video_dataset, read_video_volume

__all__ = [
    "DataError",
    "DataList",
    "Preprocessing",
    "build_loaders",
    "infer_transforms",
    "load_datalist",
    "make_mni_dataset",
    "make_synthetic_dataset",
    "make_synthetic_video_dataset",
    "read_video_volume",
    "save_like",
    "scan_cases",
    "train_transforms",
    "val_transforms",
]
