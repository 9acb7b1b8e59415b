"""HateSonar as a second offline oracle (optional extra: `pip install 'jaxdetox[hatesonar]'`).

hatesonar 0.1.0 ships an ONNX TF-IDF + logistic-regression model with three classes
(0 hate_speech, 1 offensive_language, 2 neither), trained on tweets. Toxicity is
`1 − P(neither)`. Its StringNormalizer node has no `locale` attribute, so onnxruntime falls
back to `en_US.UTF-8` and fails on machines without that locale; we load the graph with the
`onnx` package and set `locale=C.UTF-8` (always present with glibc) before creating the
session. Lower-casing ASCII is all the node does here, so scores do not change.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources

import numpy as np

from jaxdetox.oracles.base import BatchOracle, OracleUnavailableError, update_digest

_NEITHER = 2


class HateSonarOracle(BatchOracle):
    """`1 − P(neither)` from hatesonar's ONNX classifier, run with onnxruntime on CPU."""

    batch_size = 1024

    def __init__(self, locale: str = "C.UTF-8", batch_size: int | None = None) -> None:
        super().__init__(batch_size)
        try:
            import onnx
            import onnx.helper
            import onnxruntime as ort

            model_file = importlib.resources.files("hatesonar") / "model" / "model.onnx"
            version = importlib.metadata.version("hatesonar")
        except (ImportError, importlib.metadata.PackageNotFoundError) as err:
            raise OracleUnavailableError(
                f"hatesonar oracle needs hatesonar, onnx and onnxruntime "
                f"(pip install 'jaxdetox[hatesonar]'): {err}"
            ) from err
        graph = onnx.load(str(model_file))
        for node in graph.graph.node:
            if node.op_type == "StringNormalizer":
                kept = [a for a in node.attribute if a.name != "locale"]
                del node.attribute[:]
                node.attribute.extend([*kept, onnx.helper.make_attribute("locale", locale)])
        options = ort.SessionOptions()
        options.log_severity_level = 3  # onnxruntime's own warnings go to stderr otherwise
        self._session = ort.InferenceSession(
            graph.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        digest = hashlib.sha256()
        update_digest(digest, str(model_file))
        self.oracle_id = f"hatesonar/hatesonar=={version}@{digest.hexdigest()[:16]}"

    def _score_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        _, probs = self._session.run(None, {"text": np.array(texts, dtype=object)})
        # skl2onnx's ZipMap output: one {class: probability} dict per text.
        tox = np.array([1.0 - float(p[_NEITHER]) for p in probs], np.float32)
        return tox, np.ones(len(texts), bool)
