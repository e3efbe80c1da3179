"""Decisions made once, on global rank 0, and shared: file-system checks, locks, scans of a large corpus.

Every rank calls :func:`on_rank_0` (it is a collective); rank 0 runs the function and every rank returns its
result, or raises the error it raised, so no rank waits on a collective that will never come.
"""

import torch.distributed as dist


def on_rank_0(function, *args, **kwargs):
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return function(*args, **kwargs)
    outcome = [None, None]
    if dist.get_rank() == 0:
        try:
            outcome[0] = function(*args, **kwargs)
        except Exception as err:  # pickled with its attributes (a UserError keeps its exit code)
            outcome[1] = err
    dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]
