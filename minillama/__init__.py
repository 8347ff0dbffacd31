"""minillama: a small, exact and fast LLaMA inference engine."""
from minillama.api import GenerationResult, Llama

__all__ = ["Llama", "GenerationResult"]
