"""Metric families, each usable on its own on any torch module and data:

- `hessian`: top eigenvalues and trace (pyhessian), eigenvalue density by stochastic Lanczos quadrature
- `connectivity`: linear and quadratic-Bezier mode connectivity (mc), BatchNorm re-estimation
- `cka`: linear CKA between two models' representations
- `spectral`: heavy-tailed ESD metrics per layer (power-law alpha, norms, stable rank, FARMS)
- `weightspace`: norms, distances to initialisation and partners, per-layer statistics
"""
