"""The runtime: loads an artifact and runs it. Never imports transformers or moec.compiler.

`Engine` and `Completion` are imported on first use, so that `python -m moec.runtime` (whose CLI
checks its arguments and the artifact before loading torch's compiler stack) starts quickly.
"""

__all__ = ["Completion", "Engine"]


def __getattr__(name: str):
    if name in __all__:
        from moec.runtime import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'moec.runtime' has no attribute {name!r}")
