"""ZSL benchmark data: the xlsa17 format (Xian et al.) read into tensors, and a synthetic writer of it.

    PRESETS                                      {"CUB", "SUN", "AwA2"}: num_classes, num_unseen, num_attributes
    load_xlsa17(root, *, dtype=torch.float32)    -> XLSA17 (0-based, row-major; .split("trainval"|...))
    write_synthetic_xlsa17(root, preset="CUB", *, samples_per_class=10, feature_dim=2048, seed=0, ...)
                                                 -> root, with res101.mat and att_splits.mat in that format
    image_paths(image_files, images_root)        res101.mat's image paths found under the user's image folder
    ImageFolderDataset(paths, labels, transform) (image, label, index); write_synthetic_images(xlsa17_root, root)
    read_names(path), load_word_vectors(path, names=None), stand_in_vectors(K, seed)   attribute word vectors
"""

from .images import ImageFolderDataset, ImageReadError, image_paths, write_synthetic_images
from .words import load_word_vectors, read_names, stand_in_vectors
from .xlsa17 import PRESETS, XLSA17, DatasetPreset, get_preset, load_xlsa17, write_synthetic_xlsa17

__all__ = ["PRESETS", "XLSA17", "DatasetPreset", "get_preset", "load_xlsa17", "write_synthetic_xlsa17"]
__all__ += ["ImageFolderDataset", "ImageReadError", "image_paths", "write_synthetic_images"]
__all__ += ["load_word_vectors", "read_names", "stand_in_vectors"]
