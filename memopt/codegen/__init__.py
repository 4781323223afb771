"""memopt.codegen: code generation for the rewritten graphs (Inductor or eager FX) and
memopt's own Triton kernels with their PyTorch references:

* `lowrank_adam_step`: fused low-rank (GaLore-style) Adam step;
* `adam8bit_step`: 8-bit blockwise Adam step.
"""

from memopt.codegen.adam8bit import adam8bit_step
from memopt.codegen.lowrank_adam import lowrank_adam_step

__all__ = ["lowrank_adam_step", "adam8bit_step"]
