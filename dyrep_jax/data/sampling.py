"""Which examples go into which batch: pure functions of (seed, epoch, step, process).

Every process computes the same epoch permutation and takes its own contiguous rows of
each global batch, so the union over processes is exactly the single-process batch and a
run can resume at any (epoch, step) without replaying earlier steps.
"""

import numpy as np

PAD = -1  # index marking an eval padding row

_PERMUTATION_TAG = 0x5EED_0001
_AUGMENT_TAG = 0x5EED_0002


def _entropy(value: int) -> int:
    """Any Python int (negative seeds included) as a non-negative SeedSequence word."""
    return int(value) % (1 << 64)


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The shuffled order of the train split for one epoch."""
    sequence = np.random.SeedSequence([_PERMUTATION_TAG, _entropy(seed), _entropy(epoch)])
    return np.random.default_rng(sequence).permutation(num_examples)


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Host-augmentation randomness for one example in one epoch, independent of batching."""
    words = [_AUGMENT_TAG, _entropy(seed), _entropy(epoch), _entropy(index)]
    return np.random.default_rng(np.random.SeedSequence(words))


def train_indices(
    permutation: np.ndarray,
    global_batch_size: int,
    start_step: int,
    num_steps: int,
    process_index: int,
    process_count: int,
) -> np.ndarray:
    """[num_steps - start_step, local_batch] example indices this process reads, step by step."""
    used = permutation[: num_steps * global_batch_size].reshape(num_steps, global_batch_size)
    local = global_batch_size // process_count
    return used[start_step:, process_index * local:(process_index + 1) * local]


def eval_indices(
    num_examples: int, global_batch_size: int, process_index: int, process_count: int
) -> np.ndarray:
    """[num_batches, local_batch] test indices in order; PAD fills the last global batch."""
    num_batches = -(-num_examples // global_batch_size)
    padded = np.full(num_batches * global_batch_size, PAD, np.int64)
    padded[:num_examples] = np.arange(num_examples)
    batches = padded.reshape(num_batches, global_batch_size)
    local = global_batch_size // process_count
    return batches[:, process_index * local:(process_index + 1) * local]
