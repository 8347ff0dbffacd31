"""Tiny, real Hugging Face LLaMA checkpoint folders for tests, written at fixture time.

Each folder is what ``huggingface_hub`` would download for a Llama 3.1 model, only small:

  config.json                         the key set of Llama 3.1's LlamaForCausalLM config
  generation_config.json              bos, eos (a list for Llama 3.1 Instruct)
  model.safetensors                   or model-0000k-of-0000n.safetensors + model.safetensors.index.json
  tokenizer.json + tokenizer_config.json + special_tokens_map.json      (tokenizer="llama3")
  tokenizer.model + tokenizer_config.json + special_tokens_map.json     (tokenizer="sentencepiece")

Weights are random but fixed by ``seed`` (NumPy's PCG64 stream, stable across versions, so golden
files stay valid). The "llama3" tokenizer is a byte-level BPE trained here on a short embedded text,
with Llama 3's 256 special tokens at their real ids 128000-128255, so such a model has
vocab_size 128256; the gap between the trained merges and 128000 is filled with tokens that no
text can produce ("\\u2400<id>"), as a real 128k vocabulary would be, so every id decodes. The
"sentencepiece" tokenizer is a Llama-2-style BPE model (byte fallback, unk=0, bos=1, eos=2).

Nothing here imports minillama. Main entry points: :func:`write_checkpoint`, :func:`load_config`,
:func:`load_state_dict`, and the session fixture :func:`checkpoint_factory` (import it into a test
module to use it).
"""
import io
import json
import os
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

PathLike = Union[str, os.PathLike]

# -- Llama 3.1's special tokens, exactly as its tokenizer.json names them --
BEGIN_OF_TEXT = 128000  # <|begin_of_text|>
END_OF_TEXT = 128001  # <|end_of_text|>
FINETUNE_RIGHT_PAD = 128004  # <|finetune_right_pad_id|>
START_HEADER = 128006  # <|start_header_id|>
END_HEADER = 128007  # <|end_header_id|>
EOM = 128008  # <|eom_id|>
EOT = 128009  # <|eot_id|>
PYTHON_TAG = 128010  # <|python_tag|>
LLAMA3_STOP_IDS = [END_OF_TEXT, EOM, EOT]  # generation_config.json eos_token_id of 3.1 Instruct
LLAMA3_VOCAB_SIZE = 128256


def _llama3_special_tokens() -> Dict[int, str]:
    named = {
        128000: "<|begin_of_text|>",
        128001: "<|end_of_text|>",
        128002: "<|reserved_special_token_0|>",
        128003: "<|reserved_special_token_1|>",
        128004: "<|finetune_right_pad_id|>",
        128005: "<|reserved_special_token_2|>",
        128006: "<|start_header_id|>",
        128007: "<|end_header_id|>",
        128008: "<|eom_id|>",
        128009: "<|eot_id|>",
        128010: "<|python_tag|>",
    }
    # 128011 is <|reserved_special_token_3|>, ..., 128255 is <|reserved_special_token_247|>.
    named.update({i: f"<|reserved_special_token_{i - 128008}|>" for i in range(128011, 128256)})
    return named


LLAMA3_SPECIAL_TOKENS = _llama3_special_tokens()

# The chat_template of meta-llama/Llama-3.1-8B-Instruct's tokenizer_config.json, verbatim.
LLAMA31_CHAT_TEMPLATE = (
    '{{- bos_token }}\n{%- if custom_tools is defined %}\n    {%- set tools = custom_tools %}\n'
    '{%- endif %}\n{%- if not tools_in_user_message is defined %}\n'
    '    {%- set tools_in_user_message = true %}\n{%- endif %}\n'
    '{%- if not date_string is defined %}\n    {%- set date_string = "26 Jul 2024" %}\n'
    '{%- endif %}\n{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n\n'
    '{#- This block extracts the system message, so we can slot it into the right place. #}\n'
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    '    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = "" %}\n'
    '{%- endif %}\n\n{#- System message + builtin tools #}\n'
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
    '{%- if builtin_tools is defined or tools is not none %}\n'
    '    {{- "Environment: ipython\\n" }}\n{%- endif %}\n{%- if builtin_tools is defined %}\n'
    "    {{- \"Tools: \" + builtin_tools | reject('equalto', 'code_interpreter') | join(\", \")"
    ' + "\\n\\n"}}\n{%- endif %}\n{{- "Cutting Knowledge Date: December 2023\\n" }}\n'
    '{{- "Today Date: " + date_string + "\\n\\n" }}\n'
    '{%- if tools is not none and not tools_in_user_message %}\n'
    '    {{- "You have access to the following functions. To call a function, please respond '
    'with JSON for a function call." }}\n'
    "    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of "
    "argument name and its value}.' }}\n"
    '    {{- "Do not use variables.\\n\\n" }}\n    {%- for t in tools %}\n'
    '        {{- t | tojson(indent=4) }}\n        {{- "\\n\\n" }}\n    {%- endfor %}\n'
    '{%- endif %}\n{{- system_message }}\n{{- "<|eot_id|>" }}\n\n'
    '{#- Custom tools are passed in a user message with some extra guidance #}\n'
    '{%- if tools_in_user_message and not tools is none %}\n'
    '    {#- Extract the first user message so we can plug it in here #}\n'
    '    {%- if messages | length != 0 %}\n'
    "        {%- set first_user_message = messages[0]['content']|trim %}\n"
    '        {%- set messages = messages[1:] %}\n    {%- else %}\n'
    '        {{- raise_exception("Cannot put tools in the first user message when there\'s no '
    'first user message!") }}\n{%- endif %}\n'
    "    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
    '    {{- "Given the following functions, please respond with a JSON for a function call " }}\n'
    '    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}\n'
    "    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of "
    "argument name and its value}.' }}\n"
    '    {{- "Do not use variables.\\n\\n" }}\n    {%- for t in tools %}\n'
    '        {{- t | tojson(indent=4) }}\n        {{- "\\n\\n" }}\n    {%- endfor %}\n'
    '    {{- first_user_message + "<|eot_id|>"}}\n{%- endif %}\n\n'
    '{%- for message in messages %}\n'
    "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in "
    "message) %}\n"
    "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ "
    "message['content'] | trim + '<|eot_id|>' }}\n"
    "    {%- elif 'tool_calls' in message %}\n"
    '        {%- if not message.tool_calls|length == 1 %}\n'
    '            {{- raise_exception("This model only supports single tool-calls at once!") }}\n'
    '        {%- endif %}\n        {%- set tool_call = message.tool_calls[0].function %}\n'
    '        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}\n'
    "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    '            {{- "<|python_tag|>" + tool_call.name + ".call(" }}\n'
    '            {%- for arg_name, arg_val in tool_call.arguments | items %}\n'
    "                {{- arg_name + '=\"' + arg_val + '\"' }}\n"
    '                {%- if not loop.last %}\n                    {{- ", " }}\n'
    '                {%- endif %}\n                {%- endfor %}\n            {{- ")" }}\n'
    '        {%- else  %}\n'
    "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    "            {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n"
    "            {{- '\"parameters\": ' }}\n            {{- tool_call.arguments | tojson }}\n"
    '            {{- "}" }}\n        {%- endif %}\n        {%- if builtin_tools is defined %}\n'
    "            {#- This means we're in ipython mode #}\n            {{- \"<|eom_id|>\" }}\n"
    '        {%- else %}\n            {{- "<|eot_id|>" }}\n        {%- endif %}\n'
    '    {%- elif message.role == "tool" or message.role == "ipython" %}\n'
    '        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}\n'
    '        {%- if message.content is mapping or message.content is iterable %}\n'
    '            {{- message.content | tojson }}\n        {%- else %}\n'
    '            {{- message.content }}\n        {%- endif %}\n        {{- "<|eot_id|>" }}\n'
    '    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n'
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n"
)

# Llama 3's pre-tokenizer split pattern (tokenizer.json of Llama 3 / 3.1).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Training text for both tokenizers (written for these tests).
TRAINING_TEXT = """\
Once upon a time, in a small town by the sea, there lived a little girl named Lily.
Lily loved to play outside in the sunshine with her dog, Max. Max was big and brown and very happy.
One day, Lily and Max went to the park. They saw a red ball under a tall tree.
"Can I play with the ball?" Lily asked her mom. Her mom smiled and said, "Yes, you can."
Lily threw the ball and Max ran after it. He brought it back and wagged his tail.
Then the sky got dark and it started to rain. Lily and Max ran home as fast as they could.
At home, Lily had a warm cup of milk and 2 cookies. She told her mom about the ball and the tree.
The next morning the sun was bright again, and the birds were singing in the garden.
Tom, her friend, came over at 9 o'clock. They built a tower with 12 blocks and laughed.
"Let's go to the beach!" said Tom. So they walked down the road to the water's edge.
The waves were small and the sand was soft. They found 3 shells: one pink, one white, one blue.
When the day was over, Lily said, "Today was the best day ever." And she fell asleep, smiling.
"""


def _training_lines():
    return [line for line in TRAINING_TEXT.splitlines() if line]


# --------------------------------------------------------------------------------------------
# config.json / generation_config.json
# --------------------------------------------------------------------------------------------


def llama3_rope_scaling(original_max_position_embeddings: int = 8192, factor: float = 8.0) -> dict:
    """Llama 3.1's rope_scaling block (factor 8, low 1, high 4, original 8192 by default)."""
    return {
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": original_max_position_embeddings,
        "rope_type": "llama3",
    }


def make_config(
    *,
    hidden_size: int = 32,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    head_dim: Optional[int] = None,
    write_head_dim: bool = True,
    intermediate_size: int = 64,
    vocab_size: int = LLAMA3_VOCAB_SIZE,
    rope_theta: float = 500000.0,
    rope_scaling: Union[None, str, dict] = None,
    max_position_embeddings: int = 131072,
    tied: bool = False,
    attention_bias: bool = False,
    rms_norm_eps: float = 1e-5,
    dtype: str = "float32",
    bos_token_id: int = BEGIN_OF_TEXT,
    eos_token_id: Union[int, list] = LLAMA3_STOP_IDS,
) -> dict:
    """A config.json dict with Llama 3.1's key set.

    ``rope_scaling``: None, "llama3" (Llama 3.1's block) or a dict written as given.
    ``write_head_dim=False`` leaves head_dim out (as Llama 3.1 8B's config does), so a reader must
    default it to hidden_size / num_attention_heads; then ``head_dim`` must be None.
    """
    if head_dim is None:
        head_dim = hidden_size // n_heads
    elif not write_head_dim:
        raise ValueError("write_head_dim=False needs head_dim None (it must be hidden/heads)")
    if rope_scaling == "llama3":
        rope_scaling = llama3_rope_scaling()
    config = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": attention_bias,
        "attention_dropout": 0.0,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": n_heads,
        "num_hidden_layers": n_layers,
        "num_key_value_heads": n_kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": rms_norm_eps,
        "rope_scaling": rope_scaling,
        "rope_theta": rope_theta,
        "tie_word_embeddings": tied,
        "torch_dtype": dtype,
        "transformers_version": "4.43.0",
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    if not write_head_dim:
        del config["head_dim"]
    return config


# --------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------


def tensor_shapes(config: dict) -> Dict[str, tuple]:
    """HF tensor name -> shape, in the order HF's state_dict lists them."""
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q_dim = config["num_attention_heads"] * head_dim
    kv_dim = config["num_key_value_heads"] * head_dim
    inter = config["intermediate_size"]
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for proj, out_dim in (("q", q_dim), ("k", kv_dim), ("v", kv_dim)):
            shapes[p + f"self_attn.{proj}_proj.weight"] = (out_dim, hidden)
            if config["attention_bias"]:
                shapes[p + f"self_attn.{proj}_proj.bias"] = (out_dim,)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, q_dim)
        if config["attention_bias"]:
            shapes[p + "self_attn.o_proj.bias"] = (hidden,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    return shapes


def random_state_dict(config: dict, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random float32 weights with unit-scale activations, fixed by ``seed``.

    Matrices are uniform with variance 1/fan_in (so every layer matters), the embedding has unit
    variance, norm weights are 1 + U(-0.25, 0.25) (so a dropped norm weight shows), biases small.
    Values come from NumPy's PCG64 ``random()``, whose stream NumPy keeps stable.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    state = {}
    for name, shape in tensor_shapes(config).items():
        u = rng.random(int(np.prod(shape))).reshape(shape) * 2.0 - 1.0  # U(-1, 1), variance 1/3
        if name.endswith("norm.weight"):
            values = 1.0 + 0.25 * u
        elif name.endswith(".bias"):
            values = 0.1 * u
        elif name == "model.embed_tokens.weight":
            values = np.sqrt(3.0) * u
        else:
            values = np.sqrt(3.0 / shape[1]) * u
        state[name] = torch.from_numpy(values.astype(np.float32))
    return state


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def write_weights(folder: Path, state: Dict[str, torch.Tensor], shards: int) -> None:
    """``model.safetensors``, or ``shards`` files plus the HF index (metadata.total_size, weight_map)."""
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(state)
    if shards > len(names):
        raise ValueError(f"cannot split {len(names)} tensors into {shards} shards")
    bounds = np.linspace(0, len(names), shards + 1).round().astype(int)
    weight_map = {}
    for k in range(shards):
        filename = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: state[name] for name in names[bounds[k] : bounds[k + 1]]}
        save_file(part, str(folder / filename), metadata={"format": "pt"})
        weight_map.update({name: filename for name in part})
    total_size = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(folder / "model.safetensors.index.json", index)


# --------------------------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------------------------

_CACHE: Dict[str, object] = {}


def _added_token(token_id: int, content: str) -> dict:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def llama3_tokenizer_json() -> str:
    """The text of a Llama-3-style tokenizer.json (built once per process, deterministic)."""
    if "llama3" not in _CACHE:
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
        from tokenizers import trainers

        tok = Tokenizer(models.BPE(ignore_merges=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
            ]
        )
        trainer = trainers.BpeTrainer(
            vocab_size=600,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_training_lines(), trainer)
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single="<|begin_of_text|> $A",
                    pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
                    special_tokens=[("<|begin_of_text|>", BEGIN_OF_TEXT)],
                ),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        spec = json.loads(tok.to_str())
        vocab = spec["model"]["vocab"]
        # Unused ids up to 128000: no text pre-tokenizes to "\u2400..." (not a byte-level char).
        vocab.update({f"\u2400{i}": i for i in range(len(vocab), BEGIN_OF_TEXT)})
        spec["added_tokens"] = [_added_token(i, c) for i, c in LLAMA3_SPECIAL_TOKENS.items()]
        _CACHE["llama3"] = json.dumps(spec, ensure_ascii=False)
    return _CACHE["llama3"]


def write_llama3_tokenizer(folder: PathLike) -> None:
    """tokenizer.json, tokenizer_config.json (3.1 Instruct chat template), special_tokens_map.json."""
    folder = Path(folder)
    (folder / "tokenizer.json").write_text(llama3_tokenizer_json(), encoding="utf-8")
    bos = LLAMA3_SPECIAL_TOKENS[BEGIN_OF_TEXT]
    eot = LLAMA3_SPECIAL_TOKENS[EOT]
    decoder = {str(i): {k: v for k, v in _added_token(i, c).items() if k != "id"}
               for i, c in LLAMA3_SPECIAL_TOKENS.items()}
    _write_json(
        folder / "tokenizer_config.json",
        {
            "added_tokens_decoder": decoder,
            "bos_token": bos,
            "chat_template": LLAMA31_CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": True,
            "eos_token": eot,
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": 131072,
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )
    _write_json(folder / "special_tokens_map.json", {"bos_token": bos, "eos_token": eot})


def sentencepiece_model_bytes() -> bytes:
    """A Llama-2-style SentencePiece BPE model (byte fallback, unk=0 bos=1 eos=2), built once."""
    if "sentencepiece" not in _CACHE:
        import sentencepiece as spm

        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_training_lines()),
            model_writer=buf,
            model_type="bpe",
            vocab_size=512,
            hard_vocab_limit=False,
            byte_fallback=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            character_coverage=1.0,
            split_digits=True,
            add_dummy_prefix=True,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            normalization_rule_name="identity",
            num_threads=1,
            minloglevel=2,
        )
        _CACHE["sentencepiece"] = buf.getvalue()
    return _CACHE["sentencepiece"]


def sentencepiece_vocab_size() -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=sentencepiece_model_bytes()).get_piece_size()


def write_sentencepiece_tokenizer(folder: PathLike) -> None:
    """tokenizer.model + tokenizer_config.json (add_bos_token true) + special_tokens_map.json."""
    folder = Path(folder)
    (folder / "tokenizer.model").write_bytes(sentencepiece_model_bytes())
    _write_json(
        folder / "tokenizer_config.json",
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": "<s>",
            "clean_up_tokenization_spaces": False,
            "eos_token": "</s>",
            "legacy": False,
            "model_max_length": 4096,
            "pad_token": None,
            "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizer",
            "unk_token": "<unk>",
        },
    )
    _write_json(
        folder / "special_tokens_map.json",
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    )


# --------------------------------------------------------------------------------------------
# the entry point
# --------------------------------------------------------------------------------------------


def write_checkpoint(
    folder: PathLike,
    *,
    hidden_size: int = 32,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    head_dim: Optional[int] = None,
    write_head_dim: bool = True,
    intermediate_size: int = 64,
    vocab_size: Optional[int] = None,
    rope_theta: float = 500000.0,
    rope_scaling: Union[None, str, dict] = None,
    max_position_embeddings: int = 131072,
    tied: bool = False,
    attention_bias: bool = False,
    dtype: str = "float32",
    shards: int = 1,
    tokenizer: str = "llama3",
    seed: int = 0,
) -> dict:
    """Write a complete tiny HF LLaMA checkpoint into ``folder`` (created if needed).

    Args:
        tokenizer: "llama3" (tokenizer.json, vocab 128256, bos 128000, eos [128001, 128008,
            128009]) or "sentencepiece" (tokenizer.model, vocab = its piece count, bos 1, eos 2).
        vocab_size: defaults to the tokenizer's; a larger value pads the embedding (as real
            checkpoints sometimes do).
        dtype: "float32" or "bfloat16" (safetensors dtype and config torch_dtype).
        shards: 1 for model.safetensors, n > 1 for n shards plus model.safetensors.index.json.
        rope_scaling: None, "llama3" (Llama 3.1's) or an explicit dict.
        seed: fixes the weights.
    Returns:
        The config.json dict that was written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer == "llama3":
        min_vocab, bos, eos, stop = LLAMA3_VOCAB_SIZE, BEGIN_OF_TEXT, LLAMA3_STOP_IDS, LLAMA3_STOP_IDS
    elif tokenizer == "sentencepiece":
        min_vocab, bos, eos, stop = sentencepiece_vocab_size(), 1, 2, 2
    else:
        raise ValueError(f"tokenizer must be 'llama3' or 'sentencepiece', got {tokenizer!r}")
    if vocab_size is None:
        vocab_size = min_vocab
    elif vocab_size < min_vocab:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {min_vocab}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")

    config = make_config(
        hidden_size=hidden_size,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        write_head_dim=write_head_dim,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=max_position_embeddings,
        tied=tied,
        attention_bias=attention_bias,
        dtype=dtype,
        bos_token_id=bos,
        eos_token_id=eos,
    )
    _write_json(folder / "config.json", config)
    generation = {"bos_token_id": bos, "eos_token_id": stop, "transformers_version": "4.43.0"}
    if tokenizer == "llama3":
        generation.update({"do_sample": True, "temperature": 0.6, "top_p": 0.9})
    _write_json(folder / "generation_config.json", generation)

    state = {k: v.to(_DTYPES[dtype]) for k, v in random_state_dict(config, seed).items()}
    write_weights(folder, state, shards)
    if tokenizer == "llama3":
        write_llama3_tokenizer(folder)
    else:
        write_sentencepiece_tokenizer(folder)
    return config


def load_config(folder: PathLike) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def load_state_dict(folder: PathLike, dtype: torch.dtype = torch.float64) -> Dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors (single file or sharded), converted to ``dtype``."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for filename in files:
        state.update({k: v.to(dtype) for k, v in load_file(str(folder / filename)).items()})
    return state


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """``make(**write_checkpoint_kwargs) -> (folder, config)``; each distinct set is written once."""
    made: Dict[str, tuple] = {}

    def make(**kwargs):
        key = json.dumps(kwargs, sort_keys=True)
        if key not in made:
            folder = tmp_path_factory.mktemp("ckpt")
            made[key] = (folder, write_checkpoint(folder, **kwargs))
        return made[key]

    return make
