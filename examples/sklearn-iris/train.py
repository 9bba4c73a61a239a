"""Runs once, at image build time (lukewarm/build.py): fits the model and saves it beside main.py.

The iris data ships inside scikit-learn, so the build needs no network.
"""
import pickle

from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

iris = load_iris()
model = LogisticRegression(max_iter=1000).fit(iris.data, iris.target)
with open("model.pkl", "wb") as f:
    pickle.dump({"model": model, "classes": list(iris.target_names)}, f)
print(f"trained: accuracy {model.score(iris.data, iris.target):.3f} on {len(iris.data)} flowers")
