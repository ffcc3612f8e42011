"""A small local stand-in for TFDS `imagenet2012`: realistic JPEGs, prepared as ArrayRecord.

No network and no ILSVRC tars: images are synthesized (smooth colour fields, edges and
fine texture, so they compress like photos rather than like noise or flat colour), encoded
as JPEG at ImageNet-like sizes (about 400x350, quality 90) and written through TFDS's own
`imagenet2012` builder (same features, version and file names), so `tfds.data_source` and
the pipeline read them exactly as they would read the real dataset.

  python experiments/make_jpeg_set.py --out data_local/jpeg --train 2048 --validation 256
  python experiments/bench_input.py --augment imagenet --data imagenet2012 --data-dir data_local/jpeg
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

NUM_CLASSES = 1000


def synth_jpeg(rng: np.random.Generator, quality: int = 90) -> bytes:
    """One photo-like JPEG near 400x350: colour fields at two scales, sharp discs, grain."""
    width, height = int(rng.integers(360, 440)), int(rng.integers(320, 380))

    def field(rows: int, cols: int) -> np.ndarray:
        coarse = rng.integers(0, 256, (rows, cols, 3), np.uint8)
        return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.float32)

    pixels = 0.7 * field(int(rng.integers(4, 9)), int(rng.integers(4, 9)))
    pixels += 0.3 * field(height // 8, width // 8)
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(int(rng.integers(3, 8))):  # sharp edges cost bits, as in photos
        cx, cy, radius = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, 120)
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 < radius ** 2
        pixels[inside] = pixels[inside] * 0.4 + rng.uniform(0, 255, 3) * 0.6
    pixels += rng.normal(0, 14, pixels.shape)  # sensor grain / fine texture
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    image = image.filter(ImageFilter.GaussianBlur(0.5))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def local_builder_class():
    """TFDS's imagenet2012 builder with the manual-download split generators replaced."""
    import tensorflow_datasets as tfds

    base = tfds.builder_cls("imagenet2012")

    class LocalJpegImagenet(base, skip_registration=True):
        counts: dict = {}

        def _split_generators(self, dl_manager):
            return {split: self._examples(split, count) for split, count in self.counts.items()}

        def _examples(self, split, count):
            rng = np.random.default_rng([len(split), count, 90])
            for index in range(count):
                name = f"{split}_{index:07d}.JPEG"
                label = int(rng.integers(0, NUM_CLASSES))
                yield name, {"file_name": name, "image": io.BytesIO(synth_jpeg(rng)),
                             "label": label}

    LocalJpegImagenet.name = "imagenet2012"
    return LocalJpegImagenet


def make_jpeg_set(out: str, train: int, validation: int) -> dict:
    builder_class = local_builder_class()
    builder_class.counts = {"train": train, "validation": validation}
    builder = builder_class(data_dir=out, file_format="array_record")
    builder.download_and_prepare()
    files = sorted(Path(builder.data_dir).glob("*.array_record*"))
    sample = [len(synth_jpeg(np.random.default_rng(i))) for i in range(16)]
    return {"data_dir": out, "prepared": builder.data_dir, "train": train,
            "validation": validation, "files": [f.name for f in files],
            "mean_jpeg_kb": round(float(np.mean(sample)) / 1024, 1)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data_local/jpeg", help="TFDS data_dir to write into")
    parser.add_argument("--train", type=int, default=2048)
    parser.add_argument("--validation", type=int, default=256)
    args = parser.parse_args(argv)
    result = make_jpeg_set(args.out, args.train, args.validation)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
