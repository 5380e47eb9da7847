"""Tensor parallelism: one model over several GPUs of a host, one process per GPU.

`group.py` holds a rank's view of the group (the collectives the sharded model calls), `channel.py` the
step messages rank 0 sends to the other ranks, `worker.py` the other ranks' process, `executor.py` rank
0's side (it starts the workers and mirrors every runner call on them).
"""
