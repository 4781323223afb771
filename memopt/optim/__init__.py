"""memopt.optim: memory-efficient optimizers (``torch.optim.Optimizer`` subclasses).

* `GaLoreAdamW`: AdamW on gradients projected to rank r by their SVD (GaLore).
* `SubspaceAdamW`: the same in a seeded random subspace that is never stored.
* `AdamW8bit`: AdamW with blockwise 8-bit moments.
* `MeZO`: zero-order SGD from two forward passes.
* `OffloadedState`: wraps an optimizer; its state waits on disk between steps and is
  streamed through the update one parameter at a time.

Each has ``state_bytes()``; `optimizer_state_bytes` measures any torch optimizer the same
way. See docs/optimizers.md for the formulas, options and measurements.
"""

from memopt.optim._base import optimizer_state_bytes
from memopt.optim.adamw8bit import AdamW8bit
from memopt.optim.galore import GaLoreAdamW
from memopt.optim.mezo import MeZO
from memopt.optim.offload import OffloadedState
from memopt.optim.subspace import SubspaceAdamW

__all__ = ["GaLoreAdamW", "SubspaceAdamW", "AdamW8bit", "MeZO", "OffloadedState", "optimizer_state_bytes"]
