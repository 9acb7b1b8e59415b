"""The built-in offline oracle: alt-profanity-check's calibrated linear classifier.

The wheel ships a TF-IDF vectorizer and a `CalibratedClassifierCV(LinearSVC)` trained on
human-labelled toxic comments; `predict_proba[:, toxic]` is a calibrated probability, used
directly as the toxicity. It is lexical (word n-grams): strong on insults, profanity and
threats, weak on implicit hate without offensive words (see docs/assets.md).
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import warnings

import numpy as np

from jaxdetox.oracles.base import BatchOracle, OracleUnavailableError

_PACKAGE = "profanity_check"
_DIST = "alt-profanity-check"


class ProfanityCheckOracle(BatchOracle):
    """Scores with alt-profanity-check's vectorizer + calibrated classifier (CPU, offline)."""

    batch_size = 1024

    def __init__(self, batch_size: int | None = None) -> None:
        super().__init__(batch_size)
        try:
            import joblib
            import sklearn

            files = importlib.resources.files(_PACKAGE) / "data"
            version = importlib.metadata.version(_DIST)
        except (ImportError, importlib.metadata.PackageNotFoundError) as err:
            raise OracleUnavailableError(
                f"the default oracle needs the '{_DIST}' package (pip install {_DIST}): {err}"
            ) from err
        # Load the pickles ourselves rather than importing the package module, which loads
        # them at import time as globals; same files, same numbers.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Trying to unpickle.*")
            self._vectorizer = joblib.load(files / "vectorizer.joblib")
            self._model = joblib.load(files / "model.joblib")
        classes = list(self._model.classes_)
        if 1 not in classes:
            raise OracleUnavailableError(
                f"{_DIST} model has classes {classes}; expected class 1 = offensive"
            )
        self._toxic_col = classes.index(1)
        self.oracle_id = f"profanity-check/{_DIST}=={version}/sklearn=={sklearn.__version__}"

    def _score_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        prob = self._model.predict_proba(self._vectorizer.transform(texts))[:, self._toxic_col]
        return prob.astype(np.float32), np.ones(len(texts), bool)
