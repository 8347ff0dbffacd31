"""Model and generation settings, read from a Hugging Face checkpoint's config.json and
generation_config.json. Anything that changes the math and is unknown is an error, never ignored;
so is a value of the wrong JSON type or one that would make the math non-finite (an epsilon or a
RoPE base <= 0, llama3 RoPE factors that divide by zero): each error names the file and the key."""
import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from minillama.files import json_type, read_json
from minillama.quantization import QuantizationConfig, parse_quantization_config

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
FLOAT32_MAX = torch.finfo(torch.float32).max


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_number(name: str, value) -> None:
    """A finite number > 0 (in float32 too: the model computes in it)."""
    if not _is_number(value) or not math.isfinite(value) or value <= 0 or value > FLOAT32_MAX:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _token_ids(name: str, value) -> list:
    """An id or a list of ids (non-negative integers) as a list; None is []."""
    if value is None:
        return []
    ids = [value] if _is_int(value) else value
    if not isinstance(ids, list) or not all(_is_int(t) and t >= 0 for t in ids):
        raise ValueError(f"{name} must be a token id (an integer >= 0) or a list of them, got {value!r}")
    return list(ids)


@dataclass
class LlamaConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # None, or {"rope_type": "llama3", factor, low/high_freq_factor, ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    torch_dtype: str = "float32"
    bos_token_id: Optional[int] = None
    eos_token_id: list = field(default_factory=list)  # config.json's eos, as a list
    quantization_config: Optional[dict] = None  # compressed-tensors 8-bit weights (minillama.quantization)

    def __post_init__(self):
        if self.quantization_config is not None:
            parse_quantization_config(self.quantization_config)  # unsupported methods fail here, before any tensor
        for name in ("hidden_size", "num_attention_heads"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"config {name} must be a positive integer, got {value!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim in config.json"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "vocab_size", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"config {name} must be a positive integer, got {value!r}")
        if self.head_dim % 2:
            raise ValueError(f"config head_dim must be even (RoPE rotates pairs of dimensions), got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if not isinstance(self.torch_dtype, str) or self.torch_dtype not in DTYPES:
            raise ValueError(f"torch_dtype {self.torch_dtype!r} is not supported; expected one of {sorted(DTYPES)}")
        _positive_number("config rms_norm_eps", self.rms_norm_eps)
        _positive_number("config rope_theta", self.rope_theta)
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"config {name} must be true or false, got {value!r}")
        if self.bos_token_id is not None and not (_is_int(self.bos_token_id) and self.bos_token_id >= 0):
            raise ValueError(
                f"config bos_token_id must be a token id (an integer >= 0) or null, got {self.bos_token_id!r}"
            )
        self.eos_token_id = _token_ids("config eos_token_id", self.eos_token_id)
        for name, ids in (("bos_token_id", [self.bos_token_id] if self.bos_token_id is not None else []),
                          ("eos_token_id", self.eos_token_id)):
            outside = [t for t in ids if t >= self.vocab_size]
            if outside:
                raise ValueError(f"config {name} {outside} is outside the vocabulary (vocab_size {self.vocab_size})")
        if self.rope_scaling is not None:
            self.rope_scaling = _check_rope_scaling(self.rope_scaling)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.torch_dtype]

    @property
    def quantization(self) -> Optional[QuantizationConfig]:
        """The checkpoint's 8-bit weight scheme (None: full precision)."""
        return None if self.quantization_config is None else parse_quantization_config(self.quantization_config)

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a config is a JSON object, got a {json_type(d)}")
        model_type = d.get("model_type")
        if model_type != "llama":
            raise ValueError(
                f"model_type {model_type!r} is not supported: minillama loads LLaMA checkpoints (model_type 'llama')"
            )
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise NotImplementedError(f"hidden_act {act!r} is not implemented; LLaMA uses 'silu'")
        if d.get("pretraining_tp", 1) != 1:
            raise NotImplementedError(f"pretraining_tp {d['pretraining_tp']!r} is not implemented; expected 1")
        required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"config.json lacks {missing}")
        dtype = d.get("torch_dtype", d.get("dtype")) or "float32"

        def get(key, default):  # a key written as null means "the default", as in transformers
            return default if d.get(key) is None else d[key]

        rope_theta, rope_scaling = _rope_settings(d, get("rope_theta", 10000.0))

        return cls(
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=get("num_key_value_heads", d["num_attention_heads"]),
            vocab_size=d["vocab_size"],
            head_dim=d.get("head_dim"),
            rms_norm_eps=get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=get("max_position_embeddings", 2048),
            tie_word_embeddings=get("tie_word_embeddings", False),
            attention_bias=get("attention_bias", False),
            mlp_bias=get("mlp_bias", False),
            torch_dtype=dtype,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            quantization_config=d.get("quantization_config"),
        )

    @classmethod
    def from_file(cls, path) -> "LlamaConfig":
        """The config of ``path`` (config.json); every error names the file."""
        d = read_json(path)
        try:
            return cls.from_dict(d)
        except NotImplementedError as e:
            raise NotImplementedError(f"{path}: {e}") from None
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        """The HF config.json contents for this model."""
        d = asdict(self)
        if d["quantization_config"] is None:
            del d["quantization_config"]
        d["eos_token_id"] = self.eos_token_id[0] if len(self.eos_token_id) == 1 else self.eos_token_id
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", **d}


def _rope_settings(d: dict, rope_theta):
    """(rope_theta, rope_scaling) of a config.json: transformers >= 5 writes both into one
    ``rope_parameters`` object ({"rope_theta": ..., "rope_type": "default" | "llama3", ...});
    older configs have the two keys. Both forms at once must agree."""
    params = d.get("rope_parameters")
    if params is None:
        return rope_theta, d.get("rope_scaling")
    if not isinstance(params, dict) or "rope_theta" not in params:
        raise ValueError(f"config rope_parameters must be an object with a rope_theta, got {params!r}")
    if d.get("rope_theta") is not None and d["rope_theta"] != params["rope_theta"]:
        raise ValueError(f"config rope_theta {d['rope_theta']!r} and rope_parameters.rope_theta "
                         f"{params['rope_theta']!r} disagree")
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if d.get("rope_scaling") is not None and d["rope_scaling"] != scaling:
        raise ValueError(f"config rope_scaling {d['rope_scaling']!r} and rope_parameters {params!r} disagree")
    return params["rope_theta"], scaling


def _check_rope_scaling(scaling) -> Optional[dict]:
    """config.json's rope_scaling as the model uses it: None (no scaling) or a checked llama3 block."""
    if not isinstance(scaling, dict):
        raise ValueError(f"config rope_scaling must be an object or null, got {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise NotImplementedError(
            f"rope_scaling type {rope_type!r} is not implemented; minillama supports null and 'llama3'"
        )
    missing = [k for k in LLAMA3_ROPE_KEYS if k not in scaling]
    if missing:
        raise ValueError(f"rope_scaling of type 'llama3' lacks {missing}")
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        _positive_number(f"config rope_scaling.{key}", scaling[key])
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    if not high > low:
        raise ValueError(
            f"config rope_scaling.high_freq_factor ({high!r}) must be greater than low_freq_factor ({low!r}): "
            f"the llama3 scaling divides by their difference"
        )
    old_len = scaling["original_max_position_embeddings"]
    if not _is_int(old_len) or old_len <= 0:
        raise ValueError(
            f"config rope_scaling.original_max_position_embeddings must be a positive integer, got {old_len!r}"
        )
    return {"rope_type": "llama3", **{k: scaling[k] for k in LLAMA3_ROPE_KEYS}}


@dataclass
class GenerationConfig:
    """The parts of generation_config.json that minillama uses."""

    eos_token_ids: list = field(default_factory=list)
    bos_token_id: Optional[int] = None

    @classmethod
    def from_file(cls, path) -> "GenerationConfig":
        d = read_json(path)
        try:
            eos = _token_ids("eos_token_id", d.get("eos_token_id"))
            bos = d.get("bos_token_id")
            if bos is not None and not (_is_int(bos) and bos >= 0):
                raise ValueError(f"bos_token_id must be a token id (an integer >= 0) or null, got {bos!r}")
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        return cls(eos_token_ids=eos, bos_token_id=bos)


def check_vocabulary(config: LlamaConfig, generation_config: GenerationConfig, tokenizer) -> None:
    """The model's vocabulary holds every id the tokenizer makes and every stop id.

    A larger ``vocab_size`` than the tokenizer's (a padded embedding, common in fine-tunes) is fine:
    the ids past the tokenizer's are never sampled (:class:`minillama.sampling.DecodableIds`).
    """
    if config.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"config.json vocab_size {config.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} "
            f"ids: ids {config.vocab_size}..{tokenizer.vocab_size - 1} would have no embedding; the config and the "
            f"tokenizer are not from the same checkpoint"
        )
    ids = generation_config.eos_token_ids + [t for t in [generation_config.bos_token_id] if t is not None]
    outside = [t for t in ids if t >= config.vocab_size]
    if outside:
        raise ValueError(
            f"generation_config.json names token id(s) {outside} (bos_token_id / eos_token_id) outside the "
            f"vocabulary (vocab_size {config.vocab_size})"
        )
