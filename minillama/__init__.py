"""minillama: a small, exact and fast LLaMA inference engine.

``Llama`` and ``GenerationResult`` are imported on first use, so that ``import minillama.hub`` or
a command line's argument parsing does not wait for torch (and Ctrl-C while it loads is the
command's to handle).
"""
__all__ = ["Llama", "GenerationResult"]


def __getattr__(name):
    if name in __all__:
        from minillama import api

        return getattr(api, name)
    raise AttributeError(f"module 'minillama' has no attribute {name!r}")
