"""Networks (torch only): the IDQL residual MLP, the IQL critics and the EMA helpers."""

from idql_cm.nets.critics import TwinQ, ValueNet
from idql_cm.nets.ema import EMAWarmup, ema_update_
from idql_cm.nets.mlp import FourierEmbedding, IDQLMlp, ResidualBlock

__all__ = ["EMAWarmup", "FourierEmbedding", "IDQLMlp", "ResidualBlock", "TwinQ", "ValueNet", "ema_update_"]
