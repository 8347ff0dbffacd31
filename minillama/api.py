"""The public entry point: ``Llama.from_pretrained(path_or_repo_id)`` and what it returns."""
import operator
from pathlib import Path
from typing import Callable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from minillama.backend import make_backend
from minillama.config import DTYPES, GenerationConfig, LlamaConfig, check_vocabulary
from minillama.files import checkpoint_file
from minillama.generate import GenerationResult, TextGeneration, TextStream, TokenLoop
from minillama.hub import resolve_checkpoint
from minillama.kv_cache import KVCache
from minillama.parallel import check_degree, join_from_environment
from minillama.quantization import QUANTIZE_DTYPES, check_quantize_lm_head
from minillama.runner import Runner
from minillama.sampling import DecodableIds, SamplingParams
from minillama.streaming import StopStrings
from minillama.tokenizer import Tokenizer
from minillama.weights import load_model

Prompt = Union[str, Sequence[int]]


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {device!r} is not a device name; {_devices_here()}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was requested but CUDA is not available; use device='cpu'")
    missing_gpu = device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count()
    if device.type not in ("cpu", "cuda") or missing_gpu:
        raise ValueError(f"device {device} cannot run minillama; {_devices_here()}")
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


def check_sampling_args(max_new_tokens, temperature, top_k, top_p, min_p, seed, stop, presence_penalty=0.0,
                        frequency_penalty=0.0, repetition_penalty=1.0, logit_bias=None, min_tokens=0,
                        ignore_eos=False) -> Tuple[SamplingParams, List[str]]:
    """The arguments of :meth:`Llama.generate` that need no model, checked (ValueError / TypeError
    naming the value): the sampling parameters and the stop strings, as a list. Command lines call
    it before starting tensor-parallel processes, so a typo fails before any weight is read."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
                              presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                              repetition_penalty=repetition_penalty, logit_bias=logit_bias, min_tokens=min_tokens,
                              ignore_eos=ignore_eos)
    if sampling.min_tokens > max_new_tokens:
        raise ValueError(f"min_tokens {min_tokens} is more than max_new_tokens {max_new_tokens}: lower min_tokens "
                         f"or raise max_new_tokens")
    if isinstance(stop, bytes) or not isinstance(stop, (type(None), str, Sequence)):
        raise TypeError(f"stop must be a list (or None), got {type(stop).__name__}")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    StopStrings(stops)  # checks them
    return sampling, stops


class Llama:
    """A loaded checkpoint: the model and its runner, the tokenizer, and the stop ids the checkpoint declares."""

    def __init__(self, runner: Runner, tokenizer: Tokenizer, config: LlamaConfig,
                 generation_config: GenerationConfig, folder: Path):
        self.runner = runner
        self.model = runner.model
        # what generation samples from: the logits of ids the tokenizer can decode
        self.decodable = DecodableIds(config.vocab_size, tokenizer.vocab_size, tokenizer.undecodable_ids())
        self.tokenizer = tokenizer
        self.config = config
        self.generation_config = generation_config
        self.folder = folder
        self.device = runner.device
        self.dtype = runner.dtype
        stops = list(generation_config.eos_token_ids) or list(config.eos_token_id)
        if tokenizer.eos_id is not None and tokenizer.eos_id not in stops:
            stops.append(tokenizer.eos_id)
        self.stop_ids: List[int] = stops

    @classmethod
    def from_pretrained(cls, path_or_repo_id, device=None, dtype=None, backend: str = "auto",
                        tp: Optional[int] = None, progress: Optional[Callable[[int, int], None]] = None,
                        quantize: Optional[str] = None, quantize_lm_head: bool = False) -> "Llama":
        """Load a Hugging Face LLaMA checkpoint (local folder or hub repo id).

        Args:
            device: None picks "cuda" when available, else "cpu". Under torchrun each process
                takes ``cuda:LOCAL_RANK`` (a CUDA device given here names the type only).
            dtype: None keeps the checkpoint's dtype on the GPU and uses float32 on the CPU.
            backend: the kernels that run the model's ops: "triton" (fused Triton kernels, the
                single-token GEMV; decode steps replayed as CUDA graphs), "torch" (plain PyTorch)
                or "auto" (Triton on CUDA, torch elsewhere). "triton" on the CPU runs the kernels
                in Triton's interpreter and needs ``TRITON_INTERPRET=1`` (slow; for tests).
            tp: tensor-parallel degree. Under ``torchrun --nproc-per-node N`` this process joins
                the group and holds its 1/N of the model (None or N); without torchrun only None
                or 1 (the CLIs' ``--tp N`` starts torchrun's launcher).
            progress: ``progress(bytes_loaded, bytes_total)`` after each tensor is on the device.
            quantize: None, "int8" or "fp8" (float8_e4m3fn): store every q/k/v/o/gate/up/down
                weight in 8 bits with one float32 scale per output channel, quantized tensor by
                tensor while loading; the embedding stays in ``dtype``, and lm_head unless
                ``quantize_lm_head``. A checkpoint in the compressed-tensors format (e.g. the
                Llama 3.1 ``-FP8`` models) loads its 8-bit weights as they are, with
                quantize=None. See ``minillama.quantization``.
            quantize_lm_head: with ``quantize``, store lm_head in 8 bits too, the same way (the
                8B's 1.05 GB bf16 head is an eighth of what a batch-1 step reads with 8-bit
                projections); a model whose lm_head is its embedding table (tied) refuses it.
        """
        if quantize is not None and (not isinstance(quantize, str) or quantize not in QUANTIZE_DTYPES):
            raise ValueError(f"quantize must be None or one of {sorted(QUANTIZE_DTYPES)}, got {quantize!r}")
        if not isinstance(quantize_lm_head, bool):
            raise TypeError(f"quantize_lm_head must be True or False, got {quantize_lm_head!r}")
        if tp is not None and (isinstance(tp, bool) or not isinstance(tp, int) or tp < 1):
            raise ValueError(f"tp must be None or an integer >= 1, got {tp!r}")
        if progress is not None and not callable(progress):
            raise TypeError(f"progress must be None or a callable progress(bytes_loaded, bytes_total), got "
                            f"{type(progress).__name__}")
        device = _resolve_device(device)
        parallel = join_from_environment(device.type)
        world = parallel.world_size if parallel is not None else 1
        if tp is not None and tp != world:
            how = (f"this process is one of {world} under torchrun" if parallel is not None else
                   "this process was not launched by torchrun")
            raise ValueError(f"tp={tp} but {how}; launch with torchrun --nproc-per-node {tp} (or the CLIs' --tp {tp})")
        if parallel is not None and device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        kernels = make_backend(backend, device)  # a bad choice fails before anything is read
        folder = resolve_checkpoint(path_or_repo_id)
        config = LlamaConfig.from_file(folder / "config.json")
        check_quantize_lm_head(config, quantize, quantize_lm_head)  # before any weight is read
        if parallel is not None:
            check_degree(config, world)  # before any weight is read
        gen_path = checkpoint_file(folder, "generation_config.json")
        generation_config = GenerationConfig.from_file(gen_path) if gen_path else GenerationConfig()
        tokenizer = Tokenizer.from_dir(folder)
        check_vocabulary(config, generation_config, tokenizer)
        dtype = _resolve_dtype(dtype, config, device)
        model = load_model(folder, config, device, dtype, kernels, tp=parallel, progress=progress, quantize=quantize,
                           quantize_lm_head=quantize_lm_head)
        return cls(Runner(model), tokenizer, config, generation_config, folder)

    def new_cache(self, batch: int = 1, max_len: Optional[int] = None) -> KVCache:
        """An empty cache to generate into across calls (``generate``/``stream`` with ``cache=``).

        max_len: tokens per row; default the model's context (``max_position_embeddings``).
        """
        limit = self.config.max_position_embeddings
        max_len = limit if max_len is None else max_len
        if not isinstance(max_len, int) or not 0 < max_len <= limit:
            raise ValueError(f"max_len must be an integer in [1, {limit}] (the model's context), got {max_len!r}")
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
        return self.runner.new_cache(batch, max_len)

    def _prompt_ids(self, prompt: Prompt, decodable: bool = False) -> List[int]:
        """Token ids of a prompt; ``decodable``: only ids the tokenizer can decode (for generation)."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, bos=self.tokenizer.add_bos)
        ids = _token_ids(prompt)
        if not ids:
            raise ValueError("a prompt of token ids is empty: give at least one id")
        limit = self.tokenizer.vocab_size if decodable else self.config.vocab_size  # tokenizer's <= config's
        bad = [t for t in ids if not 0 <= t < limit]
        if bad:
            raise ValueError(f"token id(s) {bad[:5]} are outside the vocabulary [0, {limit})")
        return ids

    def _check_length(self, n_prompt: int, max_new_tokens: int, cached: int = 0) -> None:
        limit = self.config.max_position_embeddings
        if n_prompt == 0:
            raise ValueError("a prompt encodes to 0 tokens and the tokenizer adds no BOS: give it some text")
        held = f"{cached} cached + " if cached else ""
        if cached + n_prompt > limit:
            raise ValueError(f"{held}prompt has {n_prompt} tokens, more than the model's context of {limit}")
        if cached + n_prompt + max_new_tokens > limit:
            raise ValueError(
                f"{held}prompt of {n_prompt} tokens + max_new_tokens {max_new_tokens} = "
                f"{cached + n_prompt + max_new_tokens} exceeds the model's context of {limit}; "
                f"ask for at most {limit - cached - n_prompt} new tokens"
            )

    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """(len, vocab) float32 logits of one full forward over ``token_ids``; no state is kept."""
        ids = self._prompt_ids(token_ids)
        self._check_length(len(ids), 0)
        out = self.runner(torch.tensor([ids], device=self.device))
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
        stop: Union[str, Sequence[str], None] = None,
        stop_ids: Sequence[int] = (),
        truncate_prompt: Optional[str] = None,
        cache: Optional[KVCache] = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repetition_penalty: float = 1.0,
        logit_bias: Optional[Mapping[int, float]] = None,
        min_tokens: int = 0,
        ignore_eos: bool = False,
        skip_special_tokens: bool = False,
    ) -> List[GenerationResult]:
        """Generate for a batch of prompts of any lengths, run as one batch.

        Args:
            prompts: strings (encoded with the tokenizer's BOS setting) or lists of token ids.
            max_new_tokens: new tokens per prompt at most.
            temperature: 0 is greedy; otherwise logits are divided by it before sampling.
            top_k: sample among the k most likely tokens (0: off).
            top_p: sample among the most likely tokens that hold this much probability (1: off).
            min_p: drop tokens less likely than min_p times the most likely one (0: off).
            seed: makes sampling reproducible for the same batch on the same device.
            stop: stop string(s); the text is cut before the first one found.
            stop_ids: token ids that end a row, besides the checkpoint's (``self.stop_ids``).
            truncate_prompt: None (a prompt that does not fit is an error) or "left" (drop the
                oldest prompt tokens, after a leading BOS, until prompt + max_new_tokens fits).
            cache: continue from a cache (:meth:`new_cache`, one row per prompt): each prompt is
                appended at its row's fill. Afterwards the cache holds the prompt and every new
                token but the last one sampled (``cache.seq_lens_cpu`` says how many tokens), so
                the next call's prompt starts with that token. None: a fresh cache per call.
            presence_penalty: in [-2, 2]; subtracted from the logit of every id generated so far
                (0: off).
            frequency_penalty: in [-2, 2]; subtracted from the logit of every id generated so far,
                times how often it was (0: off).
            repetition_penalty: > 0; divides the positive logits and multiplies the negative ones
                of every id in the prompt or generated so far (1: off). With ``cache``, the prompt
                is this call's: the tokens cached before it are not seen.
            logit_bias: ``{token id: bias in [-100, 100]}`` added to the logits first (None: off).
                The order is vLLM's: logit bias, then the repetition, frequency and presence
                penalties, then temperature, top-k, min-p and top-p; greedy takes the argmax of
                the biased, penalized logits.
            min_tokens: at most ``max_new_tokens``; a row's first ``min_tokens`` new tokens are
                none of the ids that may end it (``self.stop_ids`` and ``stop_ids``; their logits
                are -inf, greedy too), and no stop string ends in their text (it may begin there),
                as vLLM's ``min_tokens`` (0: off).
            ignore_eos: the checkpoint's stop ids (``self.stop_ids``) end no row: a row runs to
                ``max_new_tokens``, ``stop_ids`` or a stop string, and a sampled EOS is a token of
                ``token_ids`` and ``text`` (its special-token text, such as "<|eot_id|>"), as vLLM's
                ``ignore_eos``. ``min_tokens`` still holds the EOS ids back, as vLLM's does.
            skip_special_tokens: ``text`` leaves out the text of special tokens the model writes
                (``self.tokenizer.special_ids``: Llama 3's ``<|python_tag|>``, reserved tokens,
                an EOS under ``ignore_eos``), as vLLM's ``skip_special_tokens`` (whose default is
                True); ``token_ids`` still hold them. False: the text as the tokenizer decodes it.
        Returns:
            One :class:`GenerationResult` per prompt, in order: ``token_ids`` (new tokens),
            ``text``, ``finish_reason`` ("stop" or "length"), ``stop`` (the id or string).

        Each row's tokens equal running its prompt alone; the loop ends when every row is done.
        Raises ValueError (naming the value) for bad arguments and for prompts that do not fit
        the model's context, before any work.
        """
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise TypeError("prompts must be a list of strings or of token-id lists; wrap one prompt in a list")
        if len(prompts) == 0:
            raise ValueError("prompts is empty: pass at least one prompt")
        generation = self._start(prompts, max_new_tokens, stop, stop_ids, truncate_prompt, cache, skip_special_tokens,
                                 temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
                                 presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                 repetition_penalty=repetition_penalty, logit_bias=logit_bias,
                                 min_tokens=min_tokens, ignore_eos=ignore_eos)
        for _ in generation:
            pass
        return generation.results()

    def stream(
        self,
        prompt: Prompt,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        seed: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None,
        stop_ids: Sequence[int] = (),
        truncate_prompt: Optional[str] = None,
        cache: Optional[KVCache] = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repetition_penalty: float = 1.0,
        logit_bias: Optional[Mapping[int, float]] = None,
        min_tokens: int = 0,
        ignore_eos: bool = False,
        skip_special_tokens: bool = False,
    ) -> TextStream:
        """Generate for one prompt, yielding text as it is decided; arguments as :meth:`generate`.

        Returns a :class:`~minillama.generate.TextStream`: iterate it for text deltas (never half a
        character, never the start of a stop string that might still match); once it is
        exhausted, its ``result`` is the :class:`GenerationResult`, whose ``text`` equals the
        concatenated deltas::

            stream = llm.stream("Once upon a time", max_new_tokens=64)
            for delta in stream:
                print(delta, end="", flush=True)
            print(stream.result.finish_reason)

        Arguments are checked here, before the first token; the model runs while iterating. With
        ``cache``, a stream iterated to its end leaves it as :meth:`generate` does; one left early
        may have the last token it yielded cached too (``cache.seq_lens_cpu`` says).
        """
        if isinstance(prompt, Sequence) and not isinstance(prompt, (str, bytes)) and any(
                isinstance(t, (str, bytes, Sequence)) for t in prompt):
            raise TypeError("stream takes one prompt (a string or a list of token ids); use generate for a batch")
        generation = self._start([prompt], max_new_tokens, stop, stop_ids, truncate_prompt, cache, skip_special_tokens,
                                 temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
                                 presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                 repetition_penalty=repetition_penalty, logit_bias=logit_bias,
                                 min_tokens=min_tokens, ignore_eos=ignore_eos)
        return TextStream(generation)

    def _start(self, prompts, max_new_tokens, stop, stop_ids, truncate_prompt, cache: Optional[KVCache],
               skip_special_tokens: bool, **sampling) -> TextGeneration:
        """Check every argument, encode the prompts and set up the loop (nothing runs yet); ``sampling``:
        the keyword arguments of :class:`~minillama.sampling.SamplingParams`."""
        if truncate_prompt not in (None, "left"):
            raise ValueError(f"truncate_prompt must be None or 'left', got {truncate_prompt!r}")
        if not isinstance(skip_special_tokens, bool):
            raise TypeError(f"skip_special_tokens must be True or False, got {skip_special_tokens!r}")
        sampling, stops = check_sampling_args(max_new_tokens, stop=stop, **sampling)
        sampling.check_vocabulary(self.tokenizer.vocab_size)
        if isinstance(stop_ids, bytes) or not isinstance(stop_ids, (type(None), str, Sequence)):
            raise TypeError(f"stop_ids must be a list (or None), got {type(stop_ids).__name__}")
        extra = list(stop_ids or [])
        bad = [t for t in extra if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"stop_ids {bad[:5]} are not token ids in [0, {self.config.vocab_size})")
        if cache is not None:
            self._check_cache(cache, len(prompts))
        cached = cache.seq_lens_cpu if cache is not None else [0] * len(prompts)
        ids = [self._prompt_ids(p, decodable=True) for p in prompts]
        if truncate_prompt == "left":
            ids = [self._truncate_left(p, max_new_tokens + n) for p, n in zip(ids, cached)]
        for p, n in zip(ids, cached):
            self._check_length(len(p), max_new_tokens, n)
        loop = TokenLoop(self.runner, ids, max_new_tokens, sampling, extra, eos_ids=self.stop_ids, cache=cache,
                         decodable=self.decodable)
        return TextGeneration(loop, self.tokenizer, stops, skip_special_tokens)

    def _check_cache(self, cache, rows: int) -> None:
        """A cache of ``rows`` rows that this model can run on (same layers, heads, dtype, device)."""
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache (Llama.new_cache), got {type(cache).__name__}")
        if cache.batch != rows:
            raise ValueError(f"cache has {cache.batch} row(s) but {rows} prompt(s) were given: make it with "
                             f"Llama.new_cache({rows})")
        # the layout this model's layers read (Transformer.new_cache): K/V (layers, B, max_len, KV heads, head_dim)
        layers, dim = self.config.num_hidden_layers, self.config.head_dim
        heads = self.model.layers[0].attention.n_kv_heads  # this rank's, under tensor parallelism
        if (cache.k.shape[0], *cache.k.shape[3:], cache.k.dtype, cache.k.device) != (
                layers, heads, dim, self.dtype, self.device):
            raise ValueError(
                f"cache was made for another model ({cache.k.dtype} on {cache.k.device}, K/V {tuple(cache.k.shape)}); "
                f"this one needs {self.dtype} on {self.device}, K/V ({layers}, rows, tokens, {heads}, {dim}): "
                f"make it with this model's new_cache"
            )

    def _truncate_left(self, ids: List[int], max_new_tokens: int) -> List[int]:
        """The newest tokens of ``ids`` that leave room for max_new_tokens (a leading BOS stays)."""
        room = self.config.max_position_embeddings - max_new_tokens
        if len(ids) <= room:
            return ids
        keep_bos = bool(ids) and ids[0] == self.tokenizer.bos_id
        if room < 1 + keep_bos:
            raise ValueError(
                f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's context "
                f"of {self.config.max_position_embeddings}"
            )
        if keep_bos:
            return ids[:1] + ids[len(ids) - room + 1:]
        return ids[len(ids) - room:]


def _devices_here() -> str:
    """The devices minillama can run on here, for error messages."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        return "this machine has: cpu (no CUDA device)"
    return "this machine has: cpu, cuda" + "".join(f", cuda:{i}" for i in range(n))


def _token_ids(prompt) -> List[int]:
    """A prompt given as token ids, as a list of ints; bytes and non-integers are TypeErrors."""
    if isinstance(prompt, (bytes, bytearray, memoryview)):
        raise TypeError("a prompt is a str or a list of token ids, got bytes: decode it first (prompt.decode('utf-8'))")
    ids = []
    try:
        for t in prompt:
            if isinstance(t, bool):
                raise TypeError
            ids.append(operator.index(t))
    except TypeError:
        raise TypeError(f"a prompt is a str or a list of int token ids, got {_describe(prompt)}") from None
    return ids


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"
