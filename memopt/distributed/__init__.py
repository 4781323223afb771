"""memopt.distributed: ZeRO-1/2/3 sharding compiled into memopt's graphs.

    import memopt.distributed as md
    model = md.shard(model, stage=3)                    # after init_process_group
    # (a model built on the meta device: md.materialize(model) after md.shard)
    optimizer = md.ShardedOptimizer(lambda p: torch.optim.AdamW(p, lr=1e-3), model)
    compiled = torch.compile(model, backend="memopt")
    md.checkpoint.save("ckpt", model, optimizer)

Parameters become DTensors (``Shard(0)``, or ``Replicate`` at stages 0-1) read through a
parametrization whose all-gather and gradient reduction are functional collectives, so
Dynamo traces them into the forward and backward graphs. See docs/sharding.md.
"""

from memopt.distributed import checkpoint
from memopt.distributed.api import MixedPrecisionPolicy, ShardedModule, shard, shard_state
from memopt.distributed.checks import ShardingError
from memopt.distributed.materialize import materialize, reset_parameters
from memopt.distributed.memory import ModelStateBytes, model_state_bytes, zero_model_state_bytes
from memopt.distributed.optimizer import ShardedOptimizer
from memopt.distributed.report import report

__all__ = [
    "shard",
    "materialize",
    "reset_parameters",
    "ShardedModule",
    "ShardedOptimizer",
    "MixedPrecisionPolicy",
    "ShardingError",
    "shard_state",
    "checkpoint",
    "ModelStateBytes",
    "model_state_bytes",
    "zero_model_state_bytes",
    "report",
]
