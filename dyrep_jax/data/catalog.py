"""Maps a dataset name from the config to the loader that opens it."""

from .errors import DataError
from .source import Source

NAMED = ("digits", "cifar10", "cifar100", "imagenet2012")
PREFIXED = ("npz:", "synthetic:")


def open_source(name: str, data_dir: str | None = None) -> Source:
    """'digits' | 'npz:PATH' | 'synthetic:H,W,C,K,NTRAIN,NTEST' | a TFDS name."""
    if name == "digits":
        from .digits import load_digits_source

        return load_digits_source()
    if name.startswith("npz:"):
        from .npz import load_npz_source

        return load_npz_source(name[len("npz:"):])
    if name.startswith("synthetic:"):
        from .synthetic import load_synthetic_source

        return load_synthetic_source(name[len("synthetic:"):])
    from .tfds_source import TFDS_DATASETS, load_tfds_source

    if name in TFDS_DATASETS:
        return load_tfds_source(name, data_dir)
    raise DataError(
        f"unknown dataset {name!r}; expected one of {', '.join(NAMED)}, "
        "npz:PATH or synthetic:H,W,C,NUM_CLASSES,N_TRAIN,N_TEST"
    )
