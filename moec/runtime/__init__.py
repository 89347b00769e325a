"""The runtime: loads an artifact and runs it. Never imports transformers or moec.compiler."""

from moec.runtime.engine import Completion, Engine

__all__ = ["Completion", "Engine"]
