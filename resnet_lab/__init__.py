"""resnet_lab: plain vs residual networks at depth (He et al. 2016), tracked in MLflow."""

__version__ = "0.1.0"
