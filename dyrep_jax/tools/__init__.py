"""Command-line tools around trained networks; none is needed for training.

- `import_torch`: a reference PyTorch checkpoint -> an orbax checkpoint of ours.
- `predict`: logits of a checkpoint (training run, import, or fused export) on a .npy batch.
- `export_torch`: the fused deploy network as a PyTorch state_dict (reference naming).

PyTorch is imported only inside the two torch tools (`requirements-interop.txt`).
"""
