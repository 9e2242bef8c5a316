"""Both stages on live text: `pipeline predict` runs the frozen backbone and trained side networks together.

The one package besides ``pipeline.extraction`` that reaches the backbone (through it, never importing
``transformers`` itself): ``pipeline.training`` stays free of stage one. ``texts`` reads the input,
``predictor`` rebuilds the stored rows from a live forward pass and runs the adapters, ``outputs`` writes
GLUE submissions or per-example rows, ``run`` ties them together for the CLI.
"""

from pipeline.inference.predictor import (
    Predictions,
    Predictor,
    find_adapters,
    load_adapters,
)
from pipeline.inference.run import (
    PredictRequest,
    PredictResult,
    metric_lines,
    run_predict,
)

__all__ = [
    "PredictRequest", "PredictResult", "Predictions", "Predictor", "find_adapters", "load_adapters",
    "metric_lines", "run_predict",
]
