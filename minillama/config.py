"""Model and generation settings, read from a Hugging Face checkpoint's config.json and
generation_config.json. Anything that changes the math and is unknown is an error, never ignored."""
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def read_json(path) -> dict:
    """A checkpoint's JSON file; invalid JSON is a ValueError naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


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

    def __post_init__(self):
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
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"config {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.torch_dtype not in DTYPES:
            raise ValueError(f"torch_dtype {self.torch_dtype!r} is not supported; expected one of {sorted(DTYPES)}")
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        self.eos_token_id = list(self.eos_token_id or [])
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rope_type == "default":
                self.rope_scaling = None
            elif rope_type != "llama3":
                raise NotImplementedError(
                    f"rope_scaling type {rope_type!r} is not implemented; minillama supports null and 'llama3'"
                )
            else:
                missing = [k for k in LLAMA3_ROPE_KEYS if k not in self.rope_scaling]
                if missing:
                    raise ValueError(f"rope_scaling of type 'llama3' lacks {missing}")
                self.rope_scaling = {"rope_type": "llama3", **{k: self.rope_scaling[k] for k in LLAMA3_ROPE_KEYS}}

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.torch_dtype]

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        model_type = d.get("model_type")
        if model_type != "llama":
            raise ValueError(
                f"model_type {model_type!r} is not supported: minillama loads LLaMA checkpoints (model_type 'llama')"
            )
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise NotImplementedError(f"hidden_act {act!r} is not implemented; LLaMA uses 'silu'")
        if d.get("quantization_config") is not None:
            q = d["quantization_config"]
            method = q.get("quant_method") if isinstance(q, dict) else q
            raise NotImplementedError(
                f"config.json has a quantization_config (quant_method {method!r}): quantized checkpoints are not "
                f"supported; use the checkpoint's bfloat16/float16/float32 release"
            )
        if d.get("pretraining_tp", 1) != 1:
            raise NotImplementedError(f"pretraining_tp {d['pretraining_tp']} is not implemented; expected 1")
        required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"config.json lacks {missing}")
        dtype = d.get("torch_dtype", d.get("dtype")) or "float32"
        return cls(
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            vocab_size=d["vocab_size"],
            head_dim=d.get("head_dim"),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=d.get("rope_theta", 10000.0),
            rope_scaling=d.get("rope_scaling"),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            attention_bias=d.get("attention_bias", False),
            mlp_bias=d.get("mlp_bias", False),
            torch_dtype=dtype,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id") or [],
        )

    @classmethod
    def from_file(cls, path) -> "LlamaConfig":
        return cls.from_dict(read_json(path))

    def to_dict(self) -> dict:
        """The HF config.json contents for this model."""
        d = asdict(self)
        d["eos_token_id"] = self.eos_token_id[0] if len(self.eos_token_id) == 1 else self.eos_token_id
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", **d}


@dataclass
class GenerationConfig:
    """The parts of generation_config.json that minillama uses."""

    eos_token_ids: list = field(default_factory=list)
    bos_token_id: Optional[int] = None

    @classmethod
    def from_file(cls, path) -> "GenerationConfig":
        d = read_json(path)
        eos = d.get("eos_token_id")
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        return cls(eos_token_ids=eos, bos_token_id=d.get("bos_token_id"))
