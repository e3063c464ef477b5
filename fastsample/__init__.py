"""fastsample: fast ODE/SDE samplers for diffusion models, every solver a drop-in diffusers scheduler."""
from .sampling import invert, make_scheduler, sample

__version__ = "0.1.0"
__all__ = ["sample", "make_scheduler", "invert"]
