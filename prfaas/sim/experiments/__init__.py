"""The simulator's recorded experiments (``prfaas sim --experiment NAME``), one module each; every
one is ``NAME(out, config=...) -> dict``: it runs, writes ``out/sim_NAME.json`` and ``.md`` (and its
plots) and returns the JSON's data.

* :func:`validation` (:mod:`.sustained_rate`): sustained rates vs the planner and the paper;
* :func:`bursty` (:mod:`.bursty_arrivals`): bursty arrivals and the Mooncake trace;
* :func:`linkdrop` (:mod:`.link_drop`): a link drop, adaptive vs fixed t;
* :func:`cache` (:mod:`.cache_routing`): cache-aware vs cache-oblivious routing;
* :func:`capacity` (:mod:`.trace_capacity`): the highest rate inside the SLO on the trace.
"""

from prfaas.sim.experiments.bursty_arrivals import bursty
from prfaas.sim.experiments.cache_routing import cache
from prfaas.sim.experiments.link_drop import linkdrop
from prfaas.sim.experiments.sustained_rate import validation
from prfaas.sim.experiments.trace_capacity import capacity

__all__ = ["bursty", "cache", "capacity", "linkdrop", "validation"]
