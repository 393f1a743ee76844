"""Tensor parallelism: the process group, its collectives, and how shapes split across ranks.

`group` owns process-group start-up (env rendezvous, as torchrun sets it) and the collectives
the model layers call; `sharding` says which rows, heads and vocabulary entries a rank holds.
Both sit below the model layers and import nothing from the rest of tesela.
"""

from tesela.distributed.group import SINGLE, TPGroup, init_distributed
from tesela.distributed.sharding import Section, check_tp_shapes

__all__ = ["SINGLE", "Section", "TPGroup", "check_tp_shapes", "init_distributed"]
