"""fastsample's solvers, each a drop-in diffusers scheduler."""
from .deis import DEIS, DEISScheduler
from .dpm_solver_pp import DPMSolverPlusPlus, DPMSolverPlusPlusScheduler
from .unipc import UniPC, UniPCScheduler

__all__ = ["DEIS", "DEISScheduler", "DPMSolverPlusPlus", "DPMSolverPlusPlusScheduler", "UniPC", "UniPCScheduler"]
