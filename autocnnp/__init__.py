"""autocnnp: XML job files to distributed data-parallel training of CNN segmentation models.

The Python API (:mod:`autocnnp.api`) is offered here too, imported on first use so that ``import autocnnp``
stays cheap: ``autocnnp.load``, ``autocnnp.validate``, ``autocnnp.plan``, ``autocnnp.train``, ..."""

__version__ = "0.1.0"

# the public names of autocnnp.api (its __all__; tests/test_api.py checks they agree)
API = ("DataCheck", "DataError", "EvaluateOptions", "Evaluation", "ExitCode", "Interrupted", "Job", "JobError",
       "Plan", "PredictOptions", "Prediction", "RunResult", "ScaleOptions", "ScaleReport", "Validation", "ZooModel",
       "check_data", "evaluate", "load", "plan", "predict", "scale", "train", "validate", "zoo_fetch", "zoo_list",
       "zoo_publish", "zoo_show")
__all__ = ["__version__", *API]


def __getattr__(name: str):
    """An API name, imported when first asked for."""
    if name not in API:
        raise AttributeError(f"module 'autocnnp' has no attribute {name!r}")
    import autocnnp.api  # the one upward import (tests/test_layers.py): the API, on first use

    return getattr(autocnnp.api, name)


def __dir__() -> list[str]:
    return sorted({*globals(), *API})
