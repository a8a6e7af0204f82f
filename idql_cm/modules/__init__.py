"""LightningModules of the four pipeline stages (imported lazily by LightningCLI class paths)."""

from idql_cm.modules.behaviour import CDModule, CTModule, EDMModule
from idql_cm.modules.iql import IQLModule

__all__ = ["IQLModule", "EDMModule", "CDModule", "CTModule"]
