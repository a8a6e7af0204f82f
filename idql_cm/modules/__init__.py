"""LightningModules of the four pipeline stages (imported lazily by LightningCLI class paths)."""

from idql_cm.modules.behaviour import CDModule, CTModule, EDMModule, MeanFlowModule
from idql_cm.modules.iql import IQLModule

__all__ = ["IQLModule", "EDMModule", "CDModule", "CTModule", "MeanFlowModule"]
