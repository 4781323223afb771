"""Modelled time of a graph's collectives against its compute: hidden or exposed.

The model (issue 16: a collective is worth starting early only while compute hides it):

* one rank runs the graph's nodes in order on one compute stream; an ordinary op
  advances the clock by its modelled seconds (`memopt.analysis.cost.node_cost`: the
  device's roofline), a view or a placeholder by nothing;
* a collective is issued at no compute cost and runs on its process group's link: the
  collectives of one group run one after another in the order they start (a FIFO
  link, as NCCL and gloo run one communicator's collectives), each from the later of
  its issue and the end of the one before it, for its network seconds (`node_cost`:
  ``size (N-1)/N`` bytes at the device's network bandwidth, twice that for an
  all-reduce, plus the launch overhead). Groups run side by side;
* a wait blocks the clock until its collective ends: that stall is the collective's
  **exposed** time; the rest of its network time is **hidden** under compute (a
  collective queued behind others can be exposed longer than its own network time:
  the queue's time shows on its wait, and it hides nothing).

``times(graph, stalls=False)`` asks instead whether each collective would be hidden
by compute alone: no wait blocks the clock, so a collective is not "hidden" by another
collective's stall that a later move would remove (a pass placing collectives one at
a time asks this; the link's queue still counts).

Approximations: compute does not slow down while a collective runs, a collective's
time does not depend on what else the device does, and a collective that is never
waited is not timed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from memopt.analysis.cost import DeviceModel, node_cost
from memopt.graph.collectives import is_collective, is_wait, waited_collective

__all__ = ["CollectiveTime", "CollectiveClock"]

EPSILON_S = 1e-12
"""Exposed time below this is none (float rounding of sums of op times)."""


@dataclass(frozen=True)
class CollectiveTime:
    """One collective of a graph, as the model times it (seconds)."""

    seconds: float
    """Its network time on the link."""
    exposed: float
    """How long its wait blocks compute (queueing behind earlier collectives included)."""

    @property
    def hidden(self) -> float:
        """Its network time that runs under compute."""
        return max(0.0, self.seconds - self.exposed)


class CollectiveClock:
    """Times the collectives of graphs on ``device`` (module docstring). Op costs are
    cached per node: moving a node does not change its cost, so a pass that reorders a
    graph and asks again pays only for the walk."""

    def __init__(self, device: DeviceModel) -> None:
        self.device = device
        self._seconds: dict[fx.Node, float] = {}

    def _cost(self, node: fx.Node) -> float:
        seconds = self._seconds.get(node)
        if seconds is None:
            seconds = self._seconds[node] = node_cost(node, self.device).seconds
        return seconds

    def times(self, graph: fx.Graph, stalls: bool = True) -> dict[fx.Node, CollectiveTime]:
        """Every waited collective of ``graph``, in the order it starts, with its
        modelled network and exposed time in the graph's current order; with
        ``stalls=False`` against compute alone (module docstring)."""
        clock = 0.0
        link_free: dict[object, float] = {}
        ends: dict[fx.Node, tuple[float, float]] = {}  # collective -> (network seconds, end)
        times: dict[fx.Node, CollectiveTime] = {}
        for node in graph.nodes:
            if is_collective(node):
                seconds, link = self._cost(node), _group(node)
                end = max(clock, link_free.get(link, 0.0)) + seconds
                link_free[link] = end
                ends[node] = (seconds, end)
            elif is_wait(node):
                collective = waited_collective(node)
                if collective is None or collective not in ends:
                    continue
                seconds, end = ends[collective]
                stall = max(0.0, end - clock)
                times[collective] = CollectiveTime(seconds, stall if stall > EPSILON_S else 0.0)
                clock += stall if stalls else 0.0
            else:
                clock += self._cost(node)
        return {c: times[c] for c in ends if c in times}


def _group(collective: fx.Node) -> object:
    """The process group a functional collective runs on: its last string argument
    (``all_gather_into_tensor(x, size, group)``, ``reduce_scatter_tensor(x, op, size,
    group)``, ``all_reduce(x, op, group)``)."""
    return next((a for a in reversed(collective.args) if isinstance(a, str)), None)
