"""QuData host agent: runs renters' containers on a GPU host for the QuData control plane."""

__version__ = "0.1.0"
