"""Ways to turn a flat, ordered list of example indices into batches of decoded examples.

Order is always preserved, so the batches depend only on the index list, not on threading
or processes. `grain_batches` is for TFDS sources (needs grain); `thread_batches` does the
same with a plain thread pool for in-memory sources that need per-example host augmentation;
`process_batches` builds whole batches in grain worker processes, past the GIL.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

Example = tuple[np.ndarray, int]
LoadFn = Callable[[int], Example]
Batch = tuple[np.ndarray, np.ndarray]


def collate(examples: Sequence[Example]) -> Batch:
    """Stack examples into (uint8 images [B, H, W, C], int32 labels [B])."""
    images = np.stack([image for image, _ in examples])
    labels = np.asarray([label for _, label in examples], np.int32)
    return images, labels


def grain_batches(
    load: LoadFn, indices: np.ndarray, batch_size: int, num_threads: int
) -> Iterator[Batch]:
    """Read with grain: each of a pool of threads builds whole batches (one grain element per
    batch, not per example: less hand-off per image), returned in order."""
    import grain

    rows = [indices[start:start + batch_size] for start in range(0, len(indices), batch_size)]
    dataset = grain.MapDataset.source(rows).map(_BatchLoader(load))
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=num_threads + 1)
    yield from dataset.to_iter_dataset(options)


def thread_batches(
    load: LoadFn, indices: np.ndarray, batch_size: int, num_threads: int, prefetch: int = 2
) -> Iterator[Batch]:
    """Load with a thread pool, keeping `prefetch` batches in flight ahead of the consumer."""
    starts = iter(range(0, len(indices), batch_size))
    pool = ThreadPoolExecutor(max_workers=num_threads)
    pending: deque = deque()

    def submit_next() -> None:
        start = next(starts, None)
        if start is not None:
            pending.append([pool.submit(load, int(i)) for i in indices[start:start + batch_size]])

    try:
        for _ in range(prefetch):
            submit_next()
        while pending:
            futures = pending.popleft()
            submit_next()
            yield collate([future.result() for future in futures])
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def process_batches(load: LoadFn, rows: np.ndarray, num_workers: int) -> Iterator[Batch]:
    """Each batch (one row of `rows`) is decoded and collated in one of `num_workers` grain
    processes; grain hands them back in row order, so the batches equal the other engines'."""
    import grain
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside absl.app
        flags.FLAGS.mark_as_parsed()
    dataset = grain.MapDataset.source([np.asarray(row) for row in rows]).map(_BatchLoader(load))
    dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
    options = grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2)
    yield from dataset.mp_prefetch(options)


class _BatchLoader:
    """Picklable `row of indices -> batch`, shipped to the worker processes."""

    def __init__(self, load: LoadFn):
        self.load = load

    def __call__(self, row: np.ndarray) -> Batch:
        return collate([self.load(int(index)) for index in row])
