"""Differentially private training: clip rules, DP optimizers, Poisson sampling and accounting.

callbacks/privacy.py makes any LightningModule private with these parts; callbacks/dp_monitor.py watches
what clipping does to each group.
"""
