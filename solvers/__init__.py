"""fastsample's solvers, each a drop-in diffusers scheduler."""
from .bdia import BDIA, BDIAScheduler, Inversion, invert
from .dc_solver import CPR, DCSolverScheduler, DynamicCompensation, fit_dc_ratios
from .deis import DEIS, DEISScheduler
from .discrete_lsd import LSDDiscreteScheduler
from .dpm_solver_pp import DPMSolverPlusPlus, DPMSolverPlusPlusScheduler
from .er_sde import ERSDE, ERSDEScheduler
from .heun import Heun, HeunScheduler
from .unipc import UniPC, UniPCScheduler

__all__ = ["BDIA", "BDIAScheduler", "CPR", "DCSolverScheduler", "DEIS", "DEISScheduler", "LSDDiscreteScheduler", "DPMSolverPlusPlus", "DPMSolverPlusPlusScheduler", "ERSDE", "ERSDEScheduler", "Heun", "HeunScheduler",
           "DynamicCompensation", "UniPC", "UniPCScheduler", "Inversion", "fit_dc_ratios", "invert"]
