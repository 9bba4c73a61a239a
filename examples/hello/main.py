"""The example model: entrypoint ``main:predict``. Standard library only."""


def predict(x):
    # Printed so the container's logs show something per call.
    print(f"predicting {x!r}", flush=True)
    if x == "raise":
        # Lets you see how a model's exception comes back to the caller.
        raise ValueError("bad input")
    return {"hello": x}
