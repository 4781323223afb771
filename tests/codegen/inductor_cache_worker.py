"""Child process of tests/codegen/test_inductor_cache.py: compile and run one training
step of the zoo's MLP with memopt (codegen="inductor") once per variant given on the
command line, and print, as one JSON line, each one's loss, gradients and Inductor's and
AOTAutograd's cache counters.

    python inductor_cache_worker.py '[{"options": {}}, {"options": {...}, "source": "x"}]'

``source`` replaces memopt's source hash (as if memopt's code had changed). The cache
directory is the caller's ``TORCHINDUCTOR_CACHE_DIR``.
"""

from __future__ import annotations

import json
import sys

import torch
from torch._dynamo.utils import counters

import memopt.codegen.inductor as memopt_inductor
from memopt.testing.zoo import zoo_case


def run(variant: dict[str, object]) -> dict[str, object]:
    torch._dynamo.reset()
    counters.clear()
    if "source" in variant:
        memopt_inductor._source_hash = lambda: str(variant["source"])  # type: ignore[assignment]
    torch.manual_seed(0)
    case = zoo_case("mlp")
    model = case.build()
    compiled = torch.compile(model, backend="memopt", options=variant["options"])
    loss = compiled(*case.inputs(4))
    loss.backward()
    grads = [p.grad.flatten().tolist() for p in model.parameters()]  # type: ignore[union-attr]
    return {"loss": loss.item(), "grads": grads, **{name: dict(counters[name]) for name in ("inductor", "aot_autograd")}}


def main() -> None:
    torch.set_num_threads(1)
    print(json.dumps([run(v) for v in json.loads(sys.argv[1])]))


if __name__ == "__main__":
    main()
