"""The math of generation, no nn.Module state: paths (flow matching, VP diffusion; prediction conversion), timesteps
(logit-normal, uniform, linear-quadratic, shifted, DDIM spacings), solvers (Euler, midpoint, DDIM), guidance
(multi-condition CFG) and multidiffusion (temporal window fusion)."""
