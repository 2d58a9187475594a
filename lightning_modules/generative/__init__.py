"""The math of generation, no nn.Module state: paths (flow matching), timesteps (logit-normal, linear-quadratic),
solvers (Euler, midpoint), guidance (CFG) and multidiffusion (temporal window fusion)."""
