"""fixnorm_ext: FixNorm (Zhou, Sun, Zhong 2021) as a fused PyTorch optimizer.

``FusedFixNorm`` is SGD with momentum plus direct norm control: after every step
each scale-invariant weight is rescaled back to a fixed norm and the classifier
weight is clamped to a maximum norm. ``fixnorm_param_groups`` decides which
parameter gets which treatment.
"""
from fixnorm_ext import reference
from fixnorm_ext.dispatch import available_backends
from fixnorm_ext.grouping import fixnorm_param_groups
from fixnorm_ext.optimizer import FusedFixNorm

__all__ = ["FusedFixNorm", "fixnorm_param_groups", "reference", "available_backends"]
__version__ = "0.1.0"
