"""Test models, one function per behaviour. Stdlib only: the base image has just python3."""
import os
import signal
import sys
import time


def echo(x):
    print(f"echo {x!r}")
    sys.stderr.write("to stderr\n")
    if x == "raise":
        raise ValueError("bad input")
    return {"echo": x}


def double_batch(xs):
    return [x * 2 for x in xs]


def slow(x):
    time.sleep(float(x))
    return x


def crash(x):
    if x == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def hog(x):
    # Allocate and touch memory until the cgroup limit kills us.
    blocks = []
    for _ in range(int(x)):
        blocks.append(bytearray(16 * 1024 * 1024))
    return len(blocks)


def whoami(_x):
    return {"uid": os.getuid(), "cwd": os.getcwd()}


def visible_gpu(_x):
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def environment(name):
    """One variable of the replica's environment, as the model sees it."""
    return os.environ.get(name)


CALLS = 0


def counted(x):
    """How many calls this replica has run, this one included (after sleeping ``x`` seconds)."""
    global CALLS
    CALLS += 1
    time.sleep(float(x))
    return CALLS
