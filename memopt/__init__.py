"""memopt: a memory-optimizing ``torch.compile`` backend.

    torch.compile(model, backend="memopt", options={"codegen": "eager"})

The backend is registered with Dynamo through an entry point, so ``backend="memopt"``
works without importing this package; import it for `explain`, `fit`, `MemoptConfig` and
the testing helpers.
"""

from memopt.backends.dynamo import memopt_backend
from memopt.config import MemoptConfig
from memopt.errors import MemoptBudgetError, MemoptBudgetWarning, MemoptFitError, MemoptInternalError, MemoptWarning
from memopt.explain import explain, record
from memopt.explanation import Explanation
from memopt.fit import FitResult, fit
from memopt.passes.base import PassFailure

__version__ = "0.1.0"

__all__ = [
    "memopt_backend",
    "MemoptConfig",
    "MemoptWarning",
    "MemoptBudgetWarning",
    "MemoptBudgetError",
    "MemoptInternalError",
    "MemoptFitError",
    "Explanation",
    "explain",
    "record",
    "fit",
    "FitResult",
    "PassFailure",
    "__version__",
]
