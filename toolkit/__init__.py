"""edgetune core: data -> augmentation -> frozen backbone features -> head -> run directory."""

__version__ = "0.1.0"
