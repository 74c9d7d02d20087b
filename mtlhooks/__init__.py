"""mtlhooks: hook-based middleware for multi-task training loops.

Replace ``loss.backward()`` with ``mtl.backward({"task": loss, ...})``; plugins chosen in a
validated config scale the losses, balance gradient norms, combine task gradients and log.
"""

from mtlhooks.config import MTLConfig, load_config
from mtlhooks.core import MTL
from mtlhooks.errors import (
    ConfigError,
    DistributedError,
    GradientError,
    InputError,
    MTLError,
    MTLWarning,
    NonFiniteError,
    OutputError,
    PluginError,
    SolverError,
)
from mtlhooks.plugin import Family, Need, Plugin, PluginConfig, Setup, Space, hookimpl
from mtlhooks.report import StepReport
from mtlhooks.step import Step, TaskGradients

__all__ = [
    "MTL",
    "ConfigError",
    "DistributedError",
    "Family",
    "GradientError",
    "InputError",
    "MTLConfig",
    "MTLError",
    "MTLWarning",
    "Need",
    "NonFiniteError",
    "OutputError",
    "Plugin",
    "PluginConfig",
    "PluginError",
    "Setup",
    "SolverError",
    "Space",
    "Step",
    "StepReport",
    "TaskGradients",
    "hookimpl",
    "load_config",
]
__version__ = "0.1.0.dev0"
