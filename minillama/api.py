"""The public entry point: ``Llama.from_pretrained(path_or_repo_id)`` and what it returns."""
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Union

import torch

from minillama.config import DTYPES, GenerationConfig, LlamaConfig
from minillama.generate import TokenLoop
from minillama.hub import resolve_checkpoint
from minillama.model import Transformer
from minillama.sampling import SamplingParams
from minillama.tokenizer import Tokenizer
from minillama.weights import load_model

Prompt = Union[str, Sequence[int]]


@dataclass
class GenerationResult:
    token_ids: List[int]  # new tokens only; a stop token is not included
    text: str  # decoded new tokens
    finish_reason: str  # "stop" or "length"
    stop: Union[int, str, None] = None  # the stop id (or stop string) that ended the row
    prompt_ids: List[int] = field(default_factory=list)
    prefill_s: float = 0.0  # time to the first token, for the whole batch
    decode_s: float = 0.0  # time of the decode steps, for the whole batch


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was requested but CUDA is not available; use device='cpu'")
    return device


def _resolve_dtype(dtype, config: LlamaConfig, device: torch.device) -> torch.dtype:
    if dtype is None:
        return config.dtype if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype {dtype} is not supported; use float32, float16 or bfloat16")
    return dtype


class Llama:
    """A loaded checkpoint: model, tokenizer and the stop ids the checkpoint declares."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, config: LlamaConfig,
                 generation_config: GenerationConfig, folder: Path):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.generation_config = generation_config
        self.folder = folder
        self.device = model.tok_embeddings.weight.device
        self.dtype = model.tok_embeddings.weight.dtype
        stops = list(generation_config.eos_token_ids) or list(config.eos_token_id)
        if tokenizer.eos_id is not None and tokenizer.eos_id not in stops:
            stops.append(tokenizer.eos_id)
        self.stop_ids: List[int] = stops

    @classmethod
    def from_pretrained(cls, path_or_repo_id, device=None, dtype=None) -> "Llama":
        """Load a Hugging Face LLaMA checkpoint (local folder or hub repo id).

        Args:
            device: None picks "cuda" when available, else "cpu".
            dtype: None keeps the checkpoint's dtype on the GPU and uses float32 on the CPU.
        """
        folder = resolve_checkpoint(path_or_repo_id)
        config = LlamaConfig.from_file(folder / "config.json")
        gen_path = folder / "generation_config.json"
        generation_config = GenerationConfig.from_file(gen_path) if gen_path.exists() else GenerationConfig()
        tokenizer = Tokenizer.from_dir(folder)
        device = _resolve_device(device)
        dtype = _resolve_dtype(dtype, config, device)
        model = load_model(folder, config, device, dtype)
        return cls(model, tokenizer, config, generation_config, folder)

    def _prompt_ids(self, prompt: Prompt) -> List[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, bos=self.tokenizer.add_bos)
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id(s) {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})")
        return ids

    def _check_length(self, n_prompt: int, max_new_tokens: int) -> None:
        limit = self.config.max_position_embeddings
        if n_prompt == 0:
            raise ValueError("a prompt encodes to 0 tokens and the tokenizer adds no BOS: give it some text")
        if n_prompt > limit:
            raise ValueError(f"prompt has {n_prompt} tokens, more than the model's context of {limit}")
        if n_prompt + max_new_tokens > limit:
            raise ValueError(
                f"prompt of {n_prompt} tokens + max_new_tokens {max_new_tokens} = {n_prompt + max_new_tokens} "
                f"exceeds the model's context of {limit}; ask for at most {limit - n_prompt} new tokens"
            )

    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """(len, vocab) float32 logits of one full forward over ``token_ids``; no state is kept."""
        ids = self._prompt_ids(token_ids)
        self._check_length(len(ids), 0)
        with torch.inference_mode():
            out = self.model(torch.tensor([ids], device=self.device))
        return out[0].float()

    def generate(
        self,
        prompts: Sequence[Prompt],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        seed: Optional[int] = None,
    ) -> List[GenerationResult]:
        """Generate for a batch of prompts (str, or lists of token ids) of any lengths, as one batch.

        Greedy at temperature 0. Each row stops on the checkpoint's stop ids or after
        ``max_new_tokens``; the loop ends when every row is done.
        """
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise TypeError("prompts must be a list of strings or of token-id lists; wrap one prompt in a list")
        if len(prompts) == 0:
            raise ValueError("prompts is empty: pass at least one prompt")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
        ids = [self._prompt_ids(p) for p in prompts]
        for p in ids:
            self._check_length(len(p), max_new_tokens)
        loop = TokenLoop(self.model, ids, max_new_tokens, sampling, self.stop_ids)
        for _ in loop:
            pass
        return [
            GenerationResult(
                token_ids=loop.new_tokens[b],
                text=self.tokenizer.decode(loop.new_tokens[b]),
                finish_reason=loop.finish_reason[b],
                stop=loop.stop_token[b],
                prompt_ids=ids[b],
                prefill_s=loop.times.prefill_s,
                decode_s=loop.times.decode_s,
            )
            for b in range(len(ids))
        ]
