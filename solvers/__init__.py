"""fastsample's solvers, each a drop-in diffusers scheduler."""
from .bdia import BDIA, BDIAScheduler, Inversion, invert
from .dc_solver import CPR, DCSolverScheduler, DynamicCompensation, fit_dc_ratios
from .deis import DEIS, DEISScheduler
from .dpm_solver_pp import DPMSolverPlusPlus, DPMSolverPlusPlusScheduler
from .er_sde import ERSDE, ERSDEScheduler
from .heun import Heun, HeunScheduler
from .sa_solver import SASolver, SASolverScheduler
from .unipc import UniPC, UniPCScheduler

__all__ = ["BDIA", "BDIAScheduler", "CPR", "DCSolverScheduler", "DEIS", "DEISScheduler", "LSDDiscreteScheduler", "DPMSolverPlusPlus", "DPMSolverPlusPlusScheduler", "ERSDE", "ERSDEScheduler", "Heun", "HeunScheduler",
           "SASolver", "SASolverScheduler",            "DynamicCompensation", "UniPC", "UniPCScheduler", "Inversion", "fit_dc_ratios", "invert"]


def __getattr__(name: str):
    """``LSDDiscreteScheduler`` subclasses diffusers' ``DiscreteDDIMScheduler``, which only recent diffusers have: it
    is imported on first use, so the other solvers work with older diffusers."""
    if name == "LSDDiscreteScheduler":
        try:
            from .discrete_lsd import LSDDiscreteScheduler
        except ImportError as e:
            raise ImportError(f"LSDDiscreteScheduler needs diffusers' DiscreteDDIMScheduler (diffusers 0.42 has it): "
                              f"{e}") from e
        return LSDDiscreteScheduler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
