"""Adapters between :class:`mtlhooks.MTL` and training engines and other MTL libraries.

- :mod:`mtlhooks.integrations.ddp`: plain ``torch.distributed`` / ``DistributedDataParallel``;
- :mod:`mtlhooks.integrations.accelerate`: Hugging Face Accelerate (imports ``accelerate``);
- :mod:`mtlhooks.integrations.lightning`: PyTorch Lightning's ``MTLModule`` (imports
  ``lightning``);
- :mod:`mtlhooks.integrations.transformers`: the Hugging Face ``MTLTrainer`` (imports
  ``transformers``);
- :mod:`mtlhooks.integrations.torchjd`: plugin ``torchjd``, any TorchJD aggregator by name
  (imports ``torchjd`` when used);
- :mod:`mtlhooks.integrations.libmtl`: an mtlhooks config as a LibMTL weighting class (does
  not import LibMTL).

They depend on the core only; ``docs/distributed.md`` describes what each gradient space does
across processes, under gradient accumulation and under mixed precision.
"""
