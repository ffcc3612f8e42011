"""Ways to turn a flat, ordered list of example indices into batches of decoded examples.

Order is always preserved, so the batches depend only on the index list, not on threading.
`grain_batches` is for TFDS sources (needs grain); `thread_batches` does the same with a
plain thread pool for in-memory sources that need per-example host augmentation.
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
    """Read with grain: a MapDataset over the index list, decoded by a pool of threads."""
    import grain

    dataset = grain.MapDataset.source(indices).map(load)
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * batch_size)
    yield from dataset.to_iter_dataset(options).batch(batch_size, batch_fn=collate)


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
