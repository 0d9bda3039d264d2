"""The parallel runtime: the device mesh and process groups, collective autograd
functions, column/row/vocab-parallel layers, sequence parallel, expert-parallel token
dispatch, pipeline stages and schedules, data parallel (FSDP2), distributed checkpointing
with resharding, FP8 linear backends, RNG state per parallel group and the cluster cost
model. It turns a plain `model` network into a parallel one from outside and knows nothing
about DeepSeek beyond "a layer". Not implemented yet: it arrives with issues 3 and 4
(Parallel I/II).
"""
