"""Runs once, at image build time (lukewarm/build.py: ``RUN python3 train.py``): writes the weights
into the image, so a replica's import has a few hundred MB to read, as a real model does.

Pseudo-random (no structure to compress), written in slices so the build holds little in memory; a
small sample of them goes into ``expected.json`` for the import to check what it read.
"""
import json
import os
import random

import weights

STEP_ROWS = 4096


def write_numpy(path, rows):
    import numpy as np

    rng = np.random.default_rng(weights.SEED)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, weights.DIM))
    for start in range(0, rows, STEP_ROWS):
        n = min(STEP_ROWS, rows - start)
        out[start:start + n] = rng.standard_normal((n, weights.DIM), dtype=np.float32)
    out.flush()
    sample = float(np.asarray(out[::max(1, rows // 64), :8], dtype=np.float64).sum())
    del out
    return sample


def write_python(path, rows):
    rng = random.Random(weights.SEED)
    sample = 0
    with open(path, "wb") as f:
        for start in range(0, rows, STEP_ROWS):
            chunk = rng.randbytes(min(STEP_ROWS, rows - start) * weights.DIM * 4)  # whole rows: 4 KiB each
            sample += sum(chunk[::4096])
            f.write(chunk)
    return float(sample)


mb, loader = weights.config()
rows = weights.rows_for(mb)
path = weights.path_for(loader)
sample = write_numpy(path, rows) if loader == "numpy" else write_python(path, rows)
with open(os.path.join(weights.HERE, "expected.json"), "w") as f:
    json.dump({"rows": rows, "dim": weights.DIM, "bytes": os.path.getsize(path), "sample": sample}, f)
print(f"weights: {os.path.getsize(path) / (1 << 20):.0f} MiB ({loader}, {rows} x {weights.DIM})")
