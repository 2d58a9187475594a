"""The pretrained Hugging Face text encoder for real, offline: tiny models built from configs here, saved with
`save_pretrained` and loaded by `HFTextEncoder` as a user's config would; its combination with the byte-level
encoder (`TextConditioner`); and the quickstart trained and sampled with its word-level + T5 encoders from the command-line
overrides. Any network access fails the test (HF_HUB_OFFLINE=1 and a socket guard)."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import hydra
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from experiments.compose import compose_config
from experiments.runner import run
from lightning_modules.generation import GenerationModule
from lightning_modules.nn.text import ByteEncoder, HFTextEncoder, TextConditioner, quoted_text

HF = "lightning_modules.nn.text.HFTextEncoder"


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch):
    """No download: Hugging Face's offline switch, and any non-local connection is an error."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    connect = socket.socket.connect

    def local_only(self, address):
        if self.family != socket.AF_UNIX and address[0] not in ("127.0.0.1", "localhost", "::1"):
            raise AssertionError(f"network access to {address} in an offline test")
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny T5 encoder (d_model 32) and the byte-level ByT5 tokenizer (no vocabulary file), as on the Hub."""
    path = tmp_path_factory.mktemp("t5")
    torch.manual_seed(0)
    config = transformers.T5Config(d_model=32, d_kv=16, num_layers=1, num_heads=2, d_ff=64, vocab_size=384,
                                   decoder_start_token_id=0)
    transformers.T5EncoderModel(config).save_pretrained(path)
    transformers.ByT5Tokenizer().save_pretrained(path)
    return path


def test_t5_encoder_from_a_local_directory(t5_dir: Path) -> None:
    enc = HFTextEncoder(str(t5_dir), max_length=16, dim=32)
    assert enc.dim == 32 and type(enc.model).__name__ == "T5EncoderModel"
    prompts = ["a red circle", "", "x" * 100]
    h, mask = enc(prompts)
    assert h.shape == (3, 16, 32) and h.dtype == torch.float32 and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [13, 1, 16]  # 12 bytes + EOS; EOS alone; cut to max_length
    assert mask[0, :13].all() and not mask[1, 1:].any()

    # exactly what the model gives when used directly
    model = transformers.T5EncoderModel.from_pretrained(t5_dir, local_files_only=True).eval()
    batch = transformers.AutoTokenizer.from_pretrained(t5_dir, local_files_only=True)(
        prompts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        direct = model(**batch).last_hidden_state
    assert torch.equal(batch["attention_mask"].bool(), mask)
    assert torch.allclose(h, direct, atol=1e-6)

    # frozen, in eval mode, and outside our parameters and state dicts (reloaded from the directory)
    assert not any(p.requires_grad for p in enc.model.parameters()) and not enc.model.training
    assert list(enc.parameters()) == [] and enc.state_dict() == {}
    enc.train()
    assert not enc.model.training

    quoted = HFTextEncoder(str(t5_dir), max_length=16, quoted_only=True)
    assert quoted(['a sign that says "OPEN"', "no quotes here"])[1].sum(1).tolist() == [5, 1]
    assert quoted_text('a sign that says "OPEN" and “24/7”') == "OPEN 24/7"

    with pytest.raises(ValueError, match="hidden size 32, the config says dim=64"):
        HFTextEncoder(str(t5_dir), dim=64)
    with pytest.raises(FileNotFoundError, match="not a local model directory"):
        HFTextEncoder(str(t5_dir / "absent"))
    with pytest.raises(ValueError, match="not a torch dtype"):
        HFTextEncoder(str(t5_dir), dtype="float33")
    assert HFTextEncoder(str(t5_dir), dtype="bfloat16")(["hi"])[0].dtype == torch.float32


def test_full_checkpoints_load_and_incomplete_ones_are_refused(tmp_path: Path) -> None:
    """A whole T5 (encoder + decoder) gives its encoder; UMT5 gets its own class (T5EncoderModel would drop
    its per-layer position biases); a directory that lacks weights is refused instead of running random."""
    tokenizer = transformers.ByT5Tokenizer()
    small = dict(d_model=32, d_kv=16, num_layers=2, num_heads=2, d_ff=64, vocab_size=384, decoder_start_token_id=0)
    full = tmp_path / "t5_full"
    transformers.T5ForConditionalGeneration(transformers.T5Config(**small)).save_pretrained(full)
    tokenizer.save_pretrained(full)
    assert HFTextEncoder(str(full), max_length=8)(["hi"])[0].shape == (1, 3, 32)

    umt5 = tmp_path / "umt5"
    torch.manual_seed(0)
    reference = transformers.UMT5EncoderModel(transformers.UMT5Config(**small)).eval()
    reference.save_pretrained(umt5)
    word_level_tokenizer().save_pretrained(umt5)  # AutoTokenizer wants a tokenizer.json for umt5
    enc = HFTextEncoder(str(umt5), max_length=8)
    assert type(enc.model).__name__ == "UMT5EncoderModel"
    ids = enc.tokenizer(["a red star"], return_tensors="pt")["input_ids"]
    assert ids.shape == (1, 3)
    with torch.no_grad():
        assert torch.allclose(enc(["a red star"])[0], reference(input_ids=ids).last_hidden_state, atol=1e-6)

    config = json.loads((full / "config.json").read_text())
    (full / "config.json").write_text(json.dumps({**config, "num_layers": 3}))  # a block with no weights
    with pytest.raises(ValueError, match="lacks weights of T5EncoderModel.*random"):
        HFTextEncoder(str(full))


def word_level_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A `tokenizers` WordLevel tokenizer trained here on two captions; it adds no special tokens."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["a red circle bounces", "a blue star sits still"],
                            trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def test_auto_model_with_a_fast_tokenizer_trained_here(tmp_path: Path) -> None:
    """Any AutoModel with `last_hidden_state` (a BERT) and a `tokenizers` WordLevel tokenizer that adds no
    special tokens: the empty prompt keeps one PAD token as its real token, so no row is fully masked."""
    fast = word_level_tokenizer()
    fast.save_pretrained(tmp_path)
    config = transformers.BertConfig(vocab_size=fast.vocab_size, hidden_size=24, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=48, max_position_embeddings=32)
    transformers.BertModel(config).save_pretrained(tmp_path)

    enc = HFTextEncoder(str(tmp_path), max_length=8)
    assert enc.dim == 24 and type(enc.model).__name__ == "BertModel"
    h, mask = enc(["a red star", "", "a purple circle"])
    assert h.shape == (3, 3, 24) and torch.isfinite(h).all()
    assert mask.tolist() == [[True] * 3, [True, False, False], [True] * 3]
    h, mask = enc([""])  # a batch of empty prompts: no column at all from the tokenizer
    assert h.shape == (1, 1, 24) and mask.tolist() == [[True]]


def test_missing_transformers_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    with pytest.raises(ImportError, match="pip install transformers"):
        HFTextEncoder(str(tmp_path))


def test_conditioner_combines_byte_and_t5_encoders(t5_dir: Path, outputs: Path) -> None:
    """P = [LN(W_byte E_byte(y)); LN(W_t5 E_t5(y))]: concatenated along the sequence, one projection and norm
    per encoder; only the projections (and the byte encoder) train, the T5 weights stay as loaded."""
    torch.manual_seed(0)
    cond = TextConditioner({"byte": ByteEncoder(16, 1, 2, 8), "t5": HFTextEncoder(str(t5_dir), max_length=6)}, dim=24)
    assert cond.max_length == 8 + 6
    assert cond.projections["byte"][0].in_features == 16 and cond.projections["t5"][0].in_features == 32
    prompts = ["hello world", "hi", ""]
    tokens, mask = cond(prompts)
    byte_mask = cond.encoders["byte"](prompts)[1]
    t5_mask = cond.encoders["t5"](prompts)[1]
    assert byte_mask.shape == (3, 8) and t5_mask.shape == (3, 6)
    assert tokens.shape == (3, 8 + 6, 24) and torch.equal(mask, torch.cat([byte_mask, t5_mask], 1))
    assert t5_mask.sum(1).tolist() == [6, 3, 1] and byte_mask.sum(1).tolist() == [8, 3, 1]
    with torch.no_grad():
        t5_part = cond.projections["t5"](cond.encoders["t5"](prompts)[0])
    assert torch.allclose(tokens[:, 8:], t5_part, atol=1e-6)
    assert torch.allclose(tokens.mean(-1), torch.zeros(3, 14), atol=1e-5)  # each encoder's LayerNorm

    names = [n for n, _ in cond.named_parameters()]
    assert names and not any(n.startswith("encoders.t5") for n in names), "frozen T5 is not our parameter"
    assert not any("encoders.t5" in k for k in cond.state_dict()), "nor in our checkpoints"
    before = {k: v.clone() for k, v in cond.encoders["t5"].model.state_dict().items()}
    projection_before = cond.projections["t5"][0].weight.clone()
    optimizer = torch.optim.AdamW(cond.parameters(), lr=1e-2)
    for _ in range(2):
        tokens, _ = cond(prompts)
        (tokens * torch.randn_like(tokens)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(cond.projections["t5"][0].weight, projection_before)
    after = cond.encoders["t5"].model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in cond.encoders["t5"].model.parameters())

    # the same, configured as a user would on the command line
    cfg = compose_config(["experiment=quickstart", f"+model.conditioners.text.encoder.encoders.t5._target_={HF}",
                          f"+model.conditioners.text.encoder.encoders.t5.path={t5_dir}", "+model.conditioners.text.encoder.encoders.t5.max_length=32"],
                         outputs / "job")
    module = hydra.utils.instantiate(cfg.model, _convert_="object")
    # the quickstart's own encoder (word-level) first, then the T5
    assert list(module.conditioners['text'].encoder.encoders) == ["word", "t5"] and isinstance(module.conditioners['text'].encoder.encoders["t5"], HFTextEncoder)
    assert module.conditioners['text'].encoder.projections["t5"][0].in_features == 32
    assert module.conditioners['text'].encoder.projections["t5"][0].out_features == cfg.model.net.dim


SMALL = ["experiment=quickstart", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
         "data.world.scenes=[8,4]", "data.world.images=[2,1]", "+data.world.seed=9", "data.batch_size=2",
         "data.val_batch_size=null",
         "data.epoch_batches=2", "data.num_workers=0", "trainer.max_steps=2", "trainer.limit_val_batches=0",
         "test_after_fit=false", "callbacks.media=null", "model.net.dim=32", "model.net.depth=1",
         "model.net.heads=2", "model.net.ffn_dim=64", "model.conditioners.text.encoder.encoders.word.dim=32",
         "model.conditioners.text.encoder.encoders.word.depth=1", "model.conditioners.text.encoder.encoders.word.heads=2", "model.sampler.steps=2"]


def test_quickstart_two_steps_with_word_and_t5_encoders(t5_dir: Path, outputs: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two optimizer steps of the quickstart with the combined encoders, from overrides (two: the DiT's
    zero-initialised outputs pass no gradient to the text in the first); the T5 stays frozen and out of the
    checkpoint; `task=sample` from that checkpoint reloads the T5 from its directory."""
    overrides = [*SMALL, f"data.data_dir={tmp_path / 'data'}", f"+model.conditioners.text.encoder.encoders.t5._target_={HF}",
                 f"+model.conditioners.text.encoder.encoders.t5.path={t5_dir}", "+model.conditioners.text.encoder.encoders.t5.max_length=32"]
    seen = {}

    def record(self) -> None:
        seen["t5"] = {k: v.clone() for k, v in self.conditioners['text'].encoder.encoders["t5"].model.state_dict().items()}
        seen["projection"] = self.conditioners['text'].encoder.projections["t5"][0].weight.detach().clone()

    monkeypatch.setattr(GenerationModule, "on_fit_end", record)
    torch.manual_seed(0)
    init_projection = hydra.utils.instantiate(compose_config(overrides, outputs / "x").model,
                                              _convert_="object").conditioners["text"].encoder.projections["t5"][0].weight.detach().clone()
    run(compose_config(overrides, outputs / "fit"))
    pretrained = transformers.T5EncoderModel.from_pretrained(t5_dir, local_files_only=True).state_dict()
    assert all(torch.equal(seen["t5"][k], v) for k, v in pretrained.items()), "the T5 weights did not train"
    assert not torch.equal(seen["projection"], init_projection), "its projection did"

    (ckpt,) = (outputs / "fit").glob("checkpoints/last.ckpt")
    checkpoint = torch.load(ckpt, weights_only=True)
    assert "conditioners.text.encoder.projections.t5.0.weight" in checkpoint["state_dict"]
    assert not any(k.startswith("conditioners.text.encoder.encoders.t5") for k in checkpoint["state_dict"])
    assert not any(k.startswith("conditioners.text.encoder.encoders.t5") for k in checkpoint["callbacks"]["EMA"]["shadow"])

    prompts = tmp_path / "prompts.txt"
    prompts.write_text('A sign that says "HI".\n')
    run(compose_config([*overrides, "task=sample", f"ckpt_path={ckpt}", f"model.sample.prompts={prompts}",
                        f"model.sample.output_dir={tmp_path / 'samples'}"], outputs / "sample"))
    assert [p.name for p in (tmp_path / "samples").glob("*.mp4")] == ["000_a_sign_that_says_hi.mp4"]
