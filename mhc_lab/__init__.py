"""mhc-lab: see residual-stream instability of Hyper-Connections, and mHC's fix, on your own machine."""

__version__ = "0.1.0"
