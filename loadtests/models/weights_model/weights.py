"""The weights' layout, shared by ``train.py`` (build time) and ``main.py`` (import time).

``config.json`` (written beside this file by loadtests/model_starts.py) says how many MiB to make and
which loader to use: ``numpy`` (a float32 matrix in ``weights.npy``, ``np.load``) or ``python`` (raw bytes
in ``weights.bin``, read into a ``bytearray``; no dependencies).
"""
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
DIM = 1024  # columns of the matrix (float32): a row is 4 KiB
SEED = 20240613


def config():
    with open(os.path.join(HERE, "config.json")) as f:
        found = json.load(f)
    return int(found["mb"]), str(found["loader"])


def rows_for(mb):
    return max(1, mb * (1 << 20) // (4 * DIM))


def path_for(loader):
    return os.path.join(HERE, "weights.npy" if loader == "numpy" else "weights.bin")
