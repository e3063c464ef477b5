"""Methods that change the model or the target rather than the integrator (FKC correctors, T-Stitch)."""
