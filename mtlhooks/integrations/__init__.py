"""Adapters between :class:`mtlhooks.MTL` and training engines.

- :mod:`mtlhooks.integrations.ddp`: plain ``torch.distributed`` / ``DistributedDataParallel``;
- :mod:`mtlhooks.integrations.accelerate`: Hugging Face Accelerate (imports ``accelerate``).

They depend on the core only; ``docs/distributed.md`` describes what each gradient space does
across processes, under gradient accumulation and under mixed precision.
"""
