"""An iris classifier (scikit-learn), trained when the image was built: input the four measurements
in cm, ``[sepal length, sepal width, petal length, petal width]``; output the species."""
import pickle

with open("model.pkl", "rb") as f:
    _saved = pickle.load(f)
MODEL, CLASSES = _saved["model"], _saved["classes"]


def predict(features):
    if not isinstance(features, list) or len(features) != 4:
        raise ValueError("send the four measurements: [sepal length, sepal width, petal length, petal width]")
    probabilities = MODEL.predict_proba([[float(x) for x in features]])[0]
    best = int(probabilities.argmax())
    return {"species": CLASSES[best], "probability": round(float(probabilities[best]), 4)}
