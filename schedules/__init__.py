"""Caching schedules: which units run at which sampling step, plus the sampler they were made for.

This package is the torch-free base layer of blockcache: the other packages import it, it imports
none of them. torch is needed only to read L2C router checkpoints (imported lazily there).
"""

from .errors import BlockcacheError
from .sampling import DDIMSampler, make_sampler, respace
from .schedule import Schedule

__all__ = ["BlockcacheError", "DDIMSampler", "Schedule", "make_sampler", "respace"]
