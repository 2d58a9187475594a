"""Text encoders behind one interface, and their combination as in Movie Gen (arXiv 2410.13720 §3.1.4).

Interface (`TextEncoder`): `encoder(texts: list[str]) -> (tokens [B, L, encoder.dim], mask bool [B, L])`,
True = a real token. Encoders:

- `ByteEncoder`: UTF-8 bytes (vocabulary 256 + BOS + PAD), learned token and position embeddings and a few
  bidirectional transformer blocks, trained from scratch with the generator. The default: no download. The
  empty prompt (the unconditional branch of guidance) is the single BOS token.
- `WordEncoder`: lower-cased words (and punctuation marks) as tokens: a given vocabulary, and the hashing trick
  (CRC-32 into `buckets` extra rows) for any other word, so an unseen word still has a stable id; same
  embeddings + transformer blocks as `ByteEncoder`, trained from scratch. For small caption vocabularies (the
  synthetic world's ~45 words) it need not learn words from characters: the sequence is ~15 tokens, not ~80.
- `HFTextEncoder`: a pretrained Hugging Face encoder (T5 / UL2 / ByT5 / mT5 / UMT5 encoder, CLIP text model, or
  any AutoModel with `last_hidden_state`) loaded from a local directory (`save_pretrained` output: model and
  tokenizer), frozen. Needs `transformers` (in the `dev` extra, not a core dependency); it is imported when the
  encoder is built, with a clear error if absent. Nothing is downloaded. Its weights are not stored in our
  checkpoints (they are reloaded from the directory), and a directory that lacks some of the model's weights is
  refused (they would be random). `quoted_only` encodes only the text between double quotes (how Movie Gen
  uses ByT5 for "visual text"). A prompt the tokenizer turns into no token at all (the empty prompt with a
  tokenizer that adds no EOS) keeps one PAD token as its real token, so that it can still be attended to.
- `CachedTextEncoder`: a frozen encoder's outputs read from a text-embedding cache (`datamodules.text_cache`,
  written by `experiments/make_shards.py text_encoder=...`) instead of computed: the frozen model need not run
  (nor fit in memory) while training. Prompts not in the cache go to a fallback encoder, if one is given.

`TextConditioner` combines several encoders the paper's way: each encoder's sequence goes through its own
Linear + LayerNorm into the model width, and the sequences are concatenated along the sequence axis:

    P = [LN_1(W_1 E_1(y)); LN_2(W_2 E_2(y)); ...]    [B, L_1 + L_2 + ..., dim],   mask = [m_1; m_2; ...]
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from datamodules.text_cache import read_text_cache
from lightning_modules.nn.attention import Attention

BOS, PAD, BYTE_VOCAB = 256, 257, 258


class TextEncoder(nn.Module):
    """Base: `dim` (output width), `max_length` (tokens), forward(texts) → (tokens [B, L, dim], mask [B, L])."""

    dim: int
    max_length: int

    def forward(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        raise TypeError(f"{type(self).__name__} must implement forward(texts)")

    @property
    def device(self) -> torch.device:
        for tensor in (*self.parameters(), *self.buffers()):
            return tensor.device
        return torch.device("cpu")


def byte_tokens(texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[BOS, utf-8 bytes...] cut to max_length and padded with PAD: (ids int64 [B, L], mask bool [B, L]),
    L = the longest sequence of the batch (≤ max_length)."""
    rows = [[BOS, *text.encode("utf-8")][:max_length] for text in texts]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return ids, ids != PAD


class _EncoderBlock(nn.Module):
    """Pre-norm bidirectional transformer block: x += Attn(LN(x)); x += MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(mlp_ratio * dim)), nn.GELU(), nn.Linear(int(mlp_ratio * dim), dim))

    def init_weights(self) -> None:
        """PyTorch's defaults (LayerNorm 1 / 0, linears Kaiming-uniform), QK-norms 1."""
        self.norm1.reset_parameters()
        self.norm2.reset_parameters()
        self.attn.init_weights()
        self.mlp[0].reset_parameters()
        self.mlp[2].reset_parameters()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_padding_mask=mask)
        return x + self.mlp(self.norm2(x))


class ByteEncoder(TextEncoder):
    """Byte-level text encoder trained from scratch (see the module docstring).

    Args:
        dim: width; depth: transformer blocks (0 = embeddings only); heads: attention heads;
        max_length: tokens including BOS (longer texts are cut).
    """

    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4, max_length: int = 256) -> None:
        super().__init__()
        self.dim, self.max_length = dim, max_length
        self.embed = nn.Embedding(BYTE_VOCAB, dim)
        self.pos = nn.Parameter(torch.empty(max_length, dim))
        self.blocks = nn.ModuleList(_EncoderBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.init_weights()

    def init_weights(self) -> None:
        """Token and position embeddings ~ N(0, 0.02²), blocks and final norm PyTorch's defaults (the meta-init
        contract of `lightning_modules.parallel`: called in `__init__` and after materialisation)."""
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        for block in self.modules():  # through activation-checkpoint wrappers
            if isinstance(block, _EncoderBlock):
                block.init_weights()
        self.norm.reset_parameters()

    def forward(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = byte_tokens(texts, self.max_length)
        ids, mask = ids.to(self.device), mask.to(self.device)
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x), mask


WORD_PATTERN = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*|[^\sa-z0-9]")


def words(text: str) -> list[str]:
    """Lower-cased words ("polka-dot" and "fps-8" stay one word) and single punctuation marks, in order."""
    return WORD_PATTERN.findall(text.lower())


class WordEncoder(TextEncoder):
    """Word-level text encoder trained from scratch (see the module docstring).

    Ids: 0 = BOS, 1 = PAD, 2 .. 1 + len(vocab) = the vocabulary's words, then `buckets` rows for every other word
    (2 + len(vocab) + crc32(word) mod buckets).

    Args:
        dim: width; depth: transformer blocks (0 = embeddings only); heads: attention heads;
        max_length: tokens including BOS (longer texts are cut); vocab: known words (lower case; duplicates and
        case are ignored); buckets: hashed rows for words outside `vocab` (>= 1).
    """

    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4, max_length: int = 64,
                 vocab: Sequence[str] | None = None, buckets: int = 256) -> None:
        super().__init__()
        if buckets < 1:
            raise ValueError(f"WordEncoder: buckets={buckets} must be >= 1 (rows for words outside the vocabulary)")
        self.dim, self.max_length, self.buckets = dim, max_length, buckets
        self.vocab = {word: 2 + i for i, word in enumerate(dict.fromkeys(str(w).lower() for w in (vocab or [])))}
        self.embed = nn.Embedding(2 + len(self.vocab) + buckets, dim)
        self.pos = nn.Parameter(torch.empty(max_length, dim))
        self.blocks = nn.ModuleList(_EncoderBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.init_weights()

    def init_weights(self) -> None:
        """As `ByteEncoder.init_weights` (the meta-init contract)."""
        ByteEncoder.init_weights(self)  # same attributes: embed, pos, blocks, norm

    def token_id(self, word: str) -> int:
        """The vocabulary's id of `word`, else its hashed bucket's."""
        known = self.vocab.get(word)
        if known is not None:
            return known
        return 2 + len(self.vocab) + zlib.crc32(word.encode("utf-8")) % self.buckets

    def tokens(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """[BOS, word ids...] cut to max_length, padded with PAD: (ids int64 [B, L], mask bool [B, L])."""
        rows = [[0, *(self.token_id(w) for w in words(text))][: self.max_length] for text in texts]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), 1, dtype=torch.long)  # PAD = 1, never a word's id
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids, ids != 1

    def forward(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokens(texts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x), mask


def quoted_text(text: str) -> str:
    """The text between double quotes ("..." or “...”), joined by spaces; "" when there is none."""
    return " ".join(m.group(1) or m.group(2) for m in re.finditer(r'"([^"]*)"|“([^”]*)”', text))


class HFTextEncoder(TextEncoder):
    """A frozen pretrained Hugging Face encoder from a local directory (see the module docstring).

    Args:
        path: local directory with the model and its tokenizer (nothing is downloaded).
        max_length: tokens (longer prompts are cut).
        dim: expected hidden size (checked after loading; None accepts the model's).
        quoted_only: encode only the quoted text of each prompt (ByT5's role in Movie Gen).
        dtype: weights dtype ("float32", "bfloat16", "float16").
    """

    ENCODER_CLASSES = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel",
                       "clip": "CLIPTextModel", "clip_text_model": "CLIPTextModel"}

    def __init__(self, path: str, max_length: int = 256, dim: int | None = None, quoted_only: bool = False,
                 dtype: str = "float32") -> None:
        super().__init__()
        try:
            import transformers
        except ImportError as exc:
            raise ImportError(
                "HFTextEncoder needs the `transformers` package (in the dev extra): `pip install transformers "
                "sentencepiece` or `pip install -e .[dev]`, or use the byte-level encoder "
                "(lightning_modules.nn.text.ByteEncoder, the default)") from exc
        if not path or not Path(path).is_dir():
            raise FileNotFoundError(f"HFTextEncoder: path={path!r} is not a local model directory")
        if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
            raise ValueError(f"HFTextEncoder: dtype={dtype!r} is not a torch dtype (float32, bfloat16, float16)")
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        # The encoder-only class of each family (T5EncoderModel would drop UMT5's per-layer position biases).
        model_class = getattr(transformers, self.ENCODER_CLASSES.get(config.model_type, "AutoModel"))
        # transformers >= 4.56 names the argument `dtype` (and warns about `torch_dtype`).
        from packaging.version import Version

        dtype_arg = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
        model, info = model_class.from_pretrained(path, local_files_only=True, output_loading_info=True,
                                                  **{dtype_arg: getattr(torch, dtype)})
        if info.get("missing_keys"):
            missing = sorted(info["missing_keys"])
            raise ValueError(f"HFTextEncoder: {path} lacks weights of {type(model).__name__} ({missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}); they would be random, not pretrained")
        hidden = getattr(model.config, "d_model", None) or getattr(model.config, "hidden_size", None)
        if dim is not None and hidden != dim:
            raise ValueError(f"HFTextEncoder: {path} has hidden size {hidden}, the config says dim={dim}")
        self.path = str(path)
        self.dim, self.max_length, self.quoted_only = int(hidden), max_length, quoted_only
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        if self.tokenizer.pad_token is None:  # batches of prompts are padded
            if self.tokenizer.eos_token is None:
                raise ValueError(f"HFTextEncoder: the tokenizer in {path} has neither a pad nor an eos token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model.eval().requires_grad_(False)
        # Not a registered submodule: frozen pretrained weights stay out of our checkpoints and optimizers.
        object.__setattr__(self, "model", model)
        self.register_buffer("_device_anchor", torch.zeros(0), persistent=False)

    @torch.no_grad()
    def forward(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.quoted_only:
            texts = [quoted_text(t) for t in texts]
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        if ids.shape[1] == 0:
            ids = torch.full((len(texts), 1), self.tokenizer.pad_token_id, dtype=ids.dtype)
            mask = torch.zeros(ids.shape, dtype=torch.bool)
        mask[:, 0] |= ~mask.any(1)  # a prompt without tokens keeps one (PAD): no row is fully masked
        device = self._device_anchor.device
        self.model.to(device)
        ids, mask = ids.to(device), mask.to(device)
        hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return hidden.float(), mask


class CachedTextEncoder(TextEncoder):
    """The embeddings of a text-embedding cache (see the module docstring), served like the live encoder's.

    Build the cache with the prompts the Text conditioner forms (fps_in_text as in training) and swap it in for
    the live encoder, e.g. for a T5 (`encoder` optional: held-out prompts when sampling):

        python experiments/make_shards.py text_encoder=T5_DIR shards=DATA output=CACHE max_length=256 [fps=data.fps]
        python experiments/run.py ... \\
          +model.conditioners.text.encoder.encoders.t5._target_=lightning_modules.nn.text.CachedTextEncoder \\
          +model.conditioners.text.encoder.encoders.t5.cache=CACHE \\
          +model.conditioners.text.encoder.encoders.t5.encoder._target_=lightning_modules.nn.text.HFTextEncoder \\
          +model.conditioners.text.encoder.encoders.t5.encoder.path=T5_DIR \\
          +model.conditioners.text.encoder.encoders.t5.encoder.max_length=256

    Returns (tokens float32 [B, L, dim], mask bool [B, L]) on the module's device, L = the batch's longest prompt
    (as `HFTextEncoder`: its real tokens equal the live encoder's; padding is zeros). The cache stays in host
    memory (in its dtype), outside parameters and state dicts: nothing trains, nothing goes to a checkpoint, and
    the encoder has no `init_weights`, so it is never built on the meta device.

    Args:
        cache: the cache's folder (its index.json: one run's, or the merge of its parts).
        encoder: the same frozen encoder, for prompts the cache lacks (same `dim` and `max_length`, no trainable
            parameters); None: such a prompt is a ValueError naming it and the cache.

    Attributes: `hits`, `misses` (prompts served from the cache / by `encoder`, counted since built),
    `fps_in_text` (how the cache's prompts were formed), `skipped` (the cache's unreadable samples).
    """

    def __init__(self, cache: str, encoder: TextEncoder | None = None) -> None:
        super().__init__()
        stored = read_text_cache(cache)
        if not stored.tokens:
            raise ValueError(f"CachedTextEncoder: the text-embedding cache {cache} holds no readable prompt")
        self.cache = str(cache)
        self.dim = int(stored.entry["dim"])
        described = stored.entry.get("encoder") or {}
        self.max_length = int(described.get("max_length") or max(len(t) for t in stored.tokens.values()))
        self.fps_in_text = stored.entry.get("fps_in_text")
        self.skipped = stored.skipped
        if encoder is not None:
            shape = (encoder.dim, getattr(encoder, "max_length", self.max_length))
            if shape != (self.dim, self.max_length):
                raise ValueError(f"CachedTextEncoder: the fallback encoder's (dim, max_length) = {shape} are not the "
                                 f"cache's {(self.dim, self.max_length)} in {cache}")
            if any(p.requires_grad for p in encoder.parameters()):
                raise ValueError("CachedTextEncoder: the fallback encoder has trainable parameters; the cache holds "
                                 "a frozen encoder's outputs, so its fallback must be that frozen encoder")
        self.encoder = encoder
        # A plain dict, not buffers: the cache may be large and is data, not state.
        self.tokens = {prompt: torch.from_numpy(t) for prompt, t in stored.tokens.items()}
        self.hits = self.misses = 0
        self.register_buffer("_device_anchor", torch.zeros(0), persistent=False)

    @torch.no_grad()
    def forward(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = list(texts)
        rows = [self.tokens.get(text) for text in texts]
        missing = [i for i, row in enumerate(rows) if row is None]
        if missing and self.encoder is None:
            raise ValueError(
                f"CachedTextEncoder: prompt {texts[missing[0]]!r} is not in the text-embedding cache {self.cache} "
                f"({len(missing)} of {len(texts)} prompts of the batch are not; cache fps_in_text="
                f"{self.fps_in_text}); encode them into the cache, or give the encoder a fallback (encoder=...)")
        if missing:
            tokens, mask = self.encoder([texts[i] for i in missing])
            for row, i in enumerate(missing):
                rows[i] = tokens[row][mask[row]].cpu()
        self.hits += len(texts) - len(missing)
        self.misses += len(missing)
        lengths = torch.tensor([len(row) for row in rows])
        tokens = nn.utils.rnn.pad_sequence([row.float() for row in rows], batch_first=True)
        mask = torch.arange(tokens.shape[1]) < lengths[:, None]
        device = self._device_anchor.device
        return tokens.to(device), mask.to(device)


class TextConditioner(nn.Module):
    """Several encoders → one context sequence (see the module docstring).

    Args:
        encoders: name → `TextEncoder` (built by Hydra from the config); None entries are skipped.
        dim: the model width the sequences are projected to.
    """

    def __init__(self, encoders: Mapping[str, TextEncoder | None], dim: int) -> None:
        super().__init__()
        encoders = {name: enc for name, enc in encoders.items() if enc is not None}
        if not encoders:
            raise ValueError("TextConditioner needs at least one encoder")
        self.dim = dim
        self.encoders = nn.ModuleDict(dict(encoders))
        self.projections = nn.ModuleDict(
            {name: nn.Sequential(nn.Linear(enc.dim, dim), nn.LayerNorm(dim)) for name, enc in self.encoders.items()})

    def init_weights(self) -> None:
        """Projections PyTorch's defaults; encoders that follow the meta-init contract (`ByteEncoder`) their own
        `init_weights`. Frozen pretrained encoders (`HFTextEncoder`) have none and are never built on meta:
        their weights are left alone."""
        for encoder in self.encoders.values():
            if callable(getattr(encoder, "init_weights", None)):
                encoder.init_weights()
        for projection in self.projections.values():
            for layer in projection:
                layer.reset_parameters()

    @property
    def max_length(self) -> int:
        return sum(enc.max_length for enc in self.encoders.values())

    def forward(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """texts (B strings) → (P [B, ΣL_i, dim], mask bool [B, ΣL_i])."""
        if isinstance(texts, str):
            raise TypeError("TextConditioner takes a list of prompts, not one string")
        tokens, masks = [], []
        for name, encoder in self.encoders.items():
            h, m = encoder(texts)
            projection = self.projections[name]
            tokens.append(projection(h.to(projection[0].weight.dtype)))
            masks.append(m.to(tokens[-1].device))
        return torch.cat(tokens, dim=1), torch.cat(masks, dim=1)


def pad_context(contexts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (tokens [B_i, L_i, d], mask [B_i, L_i]) pairs along the batch, padding to the longest L (mask False)."""
    length = max(tokens.shape[1] for tokens, _ in contexts)
    out_tokens, out_masks = [], []
    for tokens, mask in contexts:
        extra = length - tokens.shape[1]
        out_tokens.append(nn.functional.pad(tokens, (0, 0, 0, extra)))
        out_masks.append(nn.functional.pad(mask, (0, extra), value=False))
    return torch.cat(out_tokens), torch.cat(out_masks)
