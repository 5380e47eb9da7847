"""Random-weight HF checkpoints of real architectures, and a small self-made tokenizer.

No weights can be downloaded here, so tests, the demo and the benchmarks use
checkpoints with the real models' configs and random weights. Small ones are
made by instantiating the HF model (its own init) and `save_pretrained`; big
ones (13B shapes) by writing seeded random tensors straight into safetensors
shards, which is minutes faster than HF's init and needs no model in memory.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "opt": ("OPTConfig", "OPTForCausalLM"),
}

_TINY_DECODER = dict(
    num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6,
)
_TINY_OPT = dict(
    num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=4,
    max_position_embeddings=512, word_embed_proj_dim=64, dropout=0.0,
)
_LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
_LLAMA2_13B = dict(
    num_hidden_layers=40, hidden_size=5120, intermediate_size=13824, num_attention_heads=40,
    num_key_value_heads=40, head_dim=128, max_position_embeddings=4096, rms_norm_eps=1e-5, vocab_size=32000,
)

# size -> (architecture, config fields). The real shapes are the published configs'.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-2-7b": ("llama", dict(_LLAMA2_13B, num_hidden_layers=32, hidden_size=4096, intermediate_size=11008,
                                 num_attention_heads=32, num_key_value_heads=32)),
    "llama-2-13b": ("llama", _LLAMA2_13B),
    # The paper's GQA variant: 10 KV heads (group 4).
    "llama-2-13b-gqa10": ("llama", dict(_LLAMA2_13B, num_key_value_heads=10)),
    "llama-2-70b": ("llama", dict(_LLAMA2_13B, num_hidden_layers=80, hidden_size=8192, intermediate_size=28672,
                                  num_attention_heads=64, num_key_value_heads=8)),
    "llama-3.1-8b": ("llama", dict(
        num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5,
        vocab_size=128256, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE)),
    "mistral-7b": ("mistral", dict(
        num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=32768, rms_norm_eps=1e-5,
        vocab_size=32768, rope_theta=1000000.0, sliding_window=None)),
    "qwen2.5-7b": ("qwen2", dict(
        num_hidden_layers=28, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
        num_key_value_heads=4, head_dim=128, max_position_embeddings=32768, rms_norm_eps=1e-6,
        vocab_size=152064, rope_theta=1000000.0)),
    "qwen3-8b": ("qwen3", dict(
        num_hidden_layers=36, hidden_size=4096, intermediate_size=12288, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
        vocab_size=151936, rope_theta=1000000.0)),
    "opt-13b": ("opt", dict(
        num_hidden_layers=40, hidden_size=5120, ffn_dim=20480, num_attention_heads=40,
        max_position_embeddings=2048, word_embed_proj_dim=5120, vocab_size=50272, dropout=0.0)),
    "opt-66b": ("opt", dict(
        num_hidden_layers=64, hidden_size=9216, ffn_dim=36864, num_attention_heads=72,
        max_position_embeddings=2048, word_embed_proj_dim=9216, vocab_size=50272, dropout=0.0)),
}

# ---------------------------------------------------------------- tokenizer

PAD, BOS, EOS, IM_START = "<pad>", "<s>", "<|im_end|>", "<|im_start|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, "<|endoftext|>"]

# ChatML. List-valued content (OpenAI content parts) contributes its text parts.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}{%- if part['type'] == 'text' %}{{- part['text'] }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_CORPUS = """\
A conversation with a language model is a sequence of turns. In each turn the user sends a message and the
assistant writes a reply. A stateless server receives the whole history again at every turn, and it must
compute the attention keys and values of every earlier token once more. That work grows with the number of
turns, so long chats become slow and expensive. A stateful server keeps the key-value cache of each
conversation after the turn ends. It holds the cache in GPU memory while there is room, moves it to CPU memory
when the GPU fills up, and drops the oldest parts only when both tiers are full. When the next turn arrives,
the server finds the cached prefix, copies any swapped blocks back layer by layer, and computes only the new
tokens. The scheduler batches the new tokens of many requests together, so prefill and decode share one step.
Hello! How are you today? I would like to know what the weather will be like tomorrow in Paris, London,
Berlin, Tokyo, New York and San Francisco. Could you also explain how caching works, step by step?
Sure. Here is a short answer: first, the request is tokenized; second, the cache is searched; third, the
missing tokens are computed; finally, the reply is streamed back to the user, one token at a time.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. Numbers matter too:
0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 512 1024 2048 4096, 3.14159, 2.71828, 100%, $42.50, 7:30 pm.
Python code looks like this: def add(a, b): return a + b. JSON looks like {"key": "value", "list": [1, 2, 3]}.
Thank you for your help! You're welcome. Is there anything else I can do for you? Yes, please summarize
the main ideas of this discussion about memory, latency, throughput, eviction, retention and recomputation.
The system measures time to first token, time per output token, and the number of requests per second.
When memory is short, the least valuable chunks are evicted first: leading tokens of idle conversations.
"""


def build_tokenizer(out_dir: str | Path | None = None, vocab_size: int = 1024, pad_to: int | None = None):
    """A byte-level BPE trained on a built-in text: any string round-trips. Saved to out_dir if given.

    pad_to: fill the vocabulary up to this many ids with visible filler tokens ("<t17>"). A real-shape model
    has far more ids than the trained BPE; without the filler, the ids it samples beyond the BPE decode to
    nothing, and clients that read the streamed text (vLLM's benchmark client) see empty replies. The filler
    are added tokens, matched whole before the BPE runs: a reply's text encodes back to the ids that were
    sampled, so a client that resends it as history hits the cache, and its prompt does not grow eightfold
    (each "<t17>" spelt out in BPE pieces). Text without "<t" tokenizes exactly as without the filler.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # Lower- and upper-cased copies give the merges more variety to learn from.
    lines = _CORPUS.splitlines()
    tok.train_from_iterator(lines + [l.lower() for l in lines] + [l.upper() for l in lines], trainer=trainer)
    if pad_to is not None and pad_to > tok.get_vocab_size():
        tok.add_tokens([AddedToken(f"<t{i}>", normalized=False, special=False)
                        for i in range(tok.get_vocab_size(), pad_to)])
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=[IM_START, "<|endoftext|>"], clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        hf_tok.save_pretrained(str(out_dir))
    return hf_tok


# ---------------------------------------------------------------- checkpoints


def make_config(arch: str, size: str = "tiny", *, vocab_size: int | None = None, dtype: torch.dtype = torch.float32,
                token_ids: dict[str, int] | None = None, **overrides: Any):
    """The transformers config of `arch` at `size` ("tiny" or a PRESETS name), with `overrides` applied."""
    import transformers

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; known: {sorted(ARCHITECTURES)}")
    if size == "tiny":
        fields = dict(_TINY_OPT if arch == "opt" else _TINY_DECODER)
    elif size in PRESETS:
        preset_arch, fields = PRESETS[size]
        if preset_arch != arch:
            raise ValueError(f"size {size!r} is a {preset_arch} model, not {arch}")
        fields = dict(fields)
    else:
        raise ValueError(f"unknown size {size!r}; known: tiny, {sorted(PRESETS)}")
    if vocab_size is not None and "vocab_size" not in fields:
        fields["vocab_size"] = vocab_size
    fields.update(token_ids or {})
    fields.update(overrides)
    config_name, arch_name = ARCHITECTURES[arch]
    config = getattr(transformers, config_name)(**fields)
    config.architectures = [arch_name]
    config.dtype = dtype
    return config


def make_random_checkpoint(
    path: str | Path,
    arch: str,
    *,
    size: str = "tiny",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    tokenizer: bool = True,
    direct: bool | None = None,
    device: str | torch.device | None = None,
    max_shard_bytes: int = 4 << 30,
    perturb: float = 0.0,
    **overrides: Any,
) -> Path:
    """Write a random-weight checkpoint (config, weights, tokenizer) of `arch` at `size` into `path`.

    direct: write seeded N(0, 0.02) tensors straight to safetensors (default for
    > 100M parameters; `device` generates them, e.g. "cuda") instead of HF init +
    save_pretrained. perturb > 0 adds N(0, perturb) noise to norm weights and
    biases (every tensor, with HF init), which start as ones and zeros: tests of
    weight loading need them distinct. `overrides` are config fields (e.g.
    num_key_value_heads=1).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    token_ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    overrides = {"vocab_size": len(tok), **overrides}  # where the preset names no vocabulary size
    config = make_config(arch, size, dtype=dtype, token_ids=token_ids, **overrides)
    if tokenizer:  # every id the model can sample decodes to text
        build_tokenizer(path, pad_to=config.vocab_size)
    if direct is None:
        direct = _num_params(config) > 100_000_000
    if direct:
        _write_direct(config, path, dtype, seed, torch.device(device or "cpu"), max_shard_bytes, perturb)
    else:
        from transformers import AutoModelForCausalLM

        with torch.random.fork_rng(devices=[]):  # seed without disturbing the caller's RNG
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config)
            if perturb > 0:
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(torch.randn_like(p) * perturb)
        model.to(dtype).save_pretrained(str(path), max_shard_size=max_shard_bytes)
    return path


def _meta_state_shapes(config) -> dict[str, tuple[torch.Size, bool]]:
    """HF parameter names -> (shape, is a norm weight), from a model built on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    norm_weights = {
        f"{name}.weight" for name, m in model.named_modules()
        if "norm" in type(m).__name__.lower() and getattr(m, "weight", None) is not None
    }
    return {
        name: (t.shape, name in norm_weights)
        for name, t in model.state_dict().items()
        if not (tied and name.startswith("lm_head."))
    }


def _num_params(config) -> int:
    return sum(math.prod(shape) for shape, _ in _meta_state_shapes(config).values())


def _write_direct(
    config, path: Path, dtype: torch.dtype, seed: int, device: torch.device, max_shard_bytes: int, perturb: float
) -> None:
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    shapes = _meta_state_shapes(config)
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, (shape, _) in shapes.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += nbytes
    std = float(getattr(config, "initializer_range", None) or getattr(config, "init_std", 0.02))
    gen = torch.Generator(device=device).manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        tensors = {}
        for name in names:
            shape, is_norm = shapes[name]
            if is_norm or name.endswith(".bias"):
                base = 1.0 if is_norm else 0.0
                t = base + torch.randn(shape, generator=gen, device=device) * perturb
            else:
                t = torch.randn(shape, generator=gen, device=device) * std
            t = t.to(dtype).cpu()
            tensors[name] = t
            weight_map[name] = file
            total += t.numel() * t.element_size()
        save_file(tensors, str(path / file), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(str(path))
    GenerationConfig.from_model_config(config).save_pretrained(str(path))
