"""edgetune core: data -> augmentation -> frozen backbone features -> head -> run directory.

On a robot: `clf = toolkit.load("bundle/")` then `clf.classify(frame_bgr)` (toolkit.classify).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `import toolkit` (and `edgetune --help`) must not load a runtime.
    if name == "load":
        from toolkit.classify import load

        return load
    raise AttributeError(f"module 'toolkit' has no attribute {name!r}")
