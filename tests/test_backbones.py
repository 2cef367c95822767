"""Backbones: local-only loading, exact round trips, token sequences, and refusals.

Every model here is tiny and randomly initialised, written to tmp_path and loaded back through
`load_backbone`; nothing touches the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from circe import backbones
from circe.backbones import (
    TINY_CONFIG_PATH,
    Backbone,
    CorruptWeightsError,
    WeightsNotFoundError,
    build_openclip_model,
    file_sha256,
    load_backbone,
    register_builtin_config,
)

TEXTS = ["a cat", "a photo of a big red dog running on the beach with friends", ""]

# Small enough to build in well under a second; vocab_size must cover the CLIP BPE ids.
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
# Variants whose token paths differ inside open_clip: a CustomTextCLIP (text tower under
# `model.text`) and an avg-pooled tower that layer-norms only the pooled token.
VARIANTS = {
    "plain": TINY_CFG,
    "custom_text": {**TINY_CFG, "custom_text": True},
    "avgpool_final_ln": {
        **TINY_CFG,
        "vision_cfg": {**TINY_CFG["vision_cfg"], "pool_type": "avg", "final_ln_after_pool": True},
    },
}


def _images(n: int = 3, size: int = 40) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (size, size + 7, 3), dtype=np.uint8)) for _ in range(n)
    ]


def _save_state_dict(model: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _tiny_openclip(tmp_path: Path, name: str, cfg: dict) -> tuple[Path, Path, torch.nn.Module]:
    """Write config `name`.json, build it randomly, save weights -> (config, weights, model)."""
    config_path = tmp_path / f"{name}.json"
    config_path.write_text(json.dumps(cfg))
    model, _, _ = build_openclip_model(config_path)
    weights = _save_state_dict(model, tmp_path / f"{name}.safetensors")
    return config_path, weights, model.eval()


def _unique(tmp_path: Path, stem: str) -> str:
    # open_clip's config registry is process-global: one name per test run and per tmp dir.
    return f"{stem}-{tmp_path.name}"


# ------------------------------------------------------------------------------------------
# (a) open_clip round trips
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_openclip_config_path_roundtrip_is_exact(tmp_path, variant):
    config, weights, model = _tiny_openclip(tmp_path, _unique(tmp_path, variant), VARIANTS[variant])
    bb = load_backbone(f"open_clip:{config}", weights=weights)

    assert isinstance(bb, Backbone) and not bb.training
    pixels = torch.stack([bb.preprocess(im) for im in _images()])  # [3, 3, 32, 32]
    assert pixels.shape == (3, 3, 32, 32)
    ids = bb.tokenize(TEXTS)  # [3, 16]
    assert ids.shape == (3, 16)
    with torch.no_grad():
        assert torch.equal(bb.encode_image(pixels), model.encode_image(pixels))
        assert torch.equal(bb.encode_text(ids), model.encode_text(ids))

    ident = bb.identity
    assert ident.spec == f"open_clip:{config.resolve()}"
    assert ident.weights == str(weights.resolve())
    assert ident.weights_sha256 == file_sha256(weights) and len(ident.weights_sha256) == 64
    assert (ident.image_size, ident.embed_dim) == (32, 32) and bb.embed_dim == 32


def test_openclip_registered_name_roundtrip_is_exact(tmp_path):
    # Stands in for a standard name like "ViT-B-32" (too big to build in a unit test): a tiny
    # config registered with open_clip and then referred to only by name.
    name = _unique(tmp_path, "circe-test-named")
    config, weights, model = _tiny_openclip(tmp_path, name, TINY_CFG)
    open_clip.add_model_config(config)
    assert name in open_clip.list_models()

    bb = load_backbone(f"open_clip:{name}", weights=str(weights))
    pixels = torch.randn(2, 3, 32, 32)
    ids = bb.tokenize(TEXTS)
    with torch.no_grad():
        assert torch.equal(bb.encode_image(pixels), model.encode_image(pixels))
        assert torch.equal(bb.encode_text(ids), model.encode_text(ids))
    assert bb.identity.spec == f"open_clip:{name}"


def test_openclip_hub_style_wrapped_config(tmp_path):
    # A Hub snapshot's open_clip_config.json wraps the model config next to its preprocessing.
    snapshot = tmp_path / _unique(tmp_path, "snapshot")
    snapshot.mkdir()
    _, weights, model = _tiny_openclip(tmp_path, _unique(tmp_path, "bare"), TINY_CFG)
    preprocess_cfg = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resize_mode": "squash"}
    wrapped = {"model_cfg": TINY_CFG, "preprocess_cfg": preprocess_cfg}
    (snapshot / "open_clip_config.json").write_text(json.dumps(wrapped))

    bb = load_backbone(f"open_clip:{snapshot / 'open_clip_config.json'}", weights=weights)
    white = Image.new("RGB", (50, 20), (255, 255, 255))
    assert torch.allclose(bb.preprocess(white), torch.ones(3, 32, 32))  # (1 - 0.5) / 0.5
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(bb.encode_image(pixels), model.encode_image(pixels))


def test_circe_tiny_loads_shipped_config_and_weights(tmp_path, monkeypatch):
    # Stand-in for the shipped circe-tiny.safetensors (which `circe pretrain` produces).
    assert register_builtin_config() == "circe-tiny"
    model, _, _ = build_openclip_model("circe-tiny")
    weights = _save_state_dict(model, tmp_path / "circe-tiny.safetensors")
    monkeypatch.setattr(backbones, "TINY_WEIGHTS_PATH", weights)

    bb = load_backbone("circe-tiny")
    cfg = json.loads(TINY_CONFIG_PATH.read_text())
    assert bb.identity.spec == "circe-tiny"
    assert bb.identity.weights == "builtin:circe-tiny"
    assert bb.identity.image_size == cfg["vision_cfg"]["image_size"]
    assert bb.identity.embed_dim == cfg["embed_dim"]
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(bb.encode_image(pixels), model.eval().encode_image(pixels))
    assert load_backbone("circe-tiny", weights=weights).identity.weights == str(weights.resolve())


# ------------------------------------------------------------------------------------------
# (b) token sequences
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_openclip_tokens(tmp_path, variant):
    config, weights, model = _tiny_openclip(tmp_path, _unique(tmp_path, variant), VARIANTS[variant])
    bb = load_backbone(f"open_clip:{config}", weights=weights)
    pixels = torch.randn(2, 3, 32, 32)
    ids = bb.tokenize(TEXTS)

    with torch.no_grad():
        pooled, seq, mask = bb.encode_image(pixels, tokens=True)
        assert torch.equal(pooled, bb.encode_image(pixels))
        assert seq.shape == (2, 1 + (32 // 8) ** 2, 64)  # class token + 4x4 patches
        assert mask.dtype == torch.bool and mask.shape == (2, 17) and mask.all()
        # The sequence is ln_post'ed: its mean over channels is ~0 and std ~1 at init.
        assert seq.mean(-1).abs().max() < 1e-4
        if VARIANTS[variant]["vision_cfg"].get("pool_type", "tok") == "tok":
            # the class token is what open_clip pools and projects
            assert torch.allclose(seq[:, 0] @ model.visual.proj, pooled, atol=1e-5)

        pooled_t, seq_t, mask_t = bb.encode_text(ids, tokens=True)
        assert torch.equal(pooled_t, bb.encode_text(ids))
        assert seq_t.shape == (3, 16, 64) and mask_t.shape == (3, 16)
        # open_clip pools the EOT token (argmax id) of the final-layer-normed sequence
        eot = ids.argmax(dim=1)
        proj = model.text.text_projection if variant == "custom_text" else model.text_projection
        assert torch.allclose(seq_t[torch.arange(3), eot] @ proj, pooled_t, atol=1e-5)

    # mask: exactly SOT + the words + EOT
    eot_id = open_clip.get_tokenizer(config.stem).eot_token_id
    for row in range(len(TEXTS)):
        n_real = int((ids[row] != 0).sum())
        assert ids[row, n_real - 1] == eot_id
        assert mask_t[row].tolist() == [True] * n_real + [False] * (16 - n_real)
    assert mask_t[2].sum() == 2  # "" -> SOT, EOT


# ------------------------------------------------------------------------------------------
# (c) refusals and errors
# ------------------------------------------------------------------------------------------


def test_missing_weights_file_names_the_path(tmp_path):
    config, _, _ = _tiny_openclip(tmp_path, _unique(tmp_path, "missing"), TINY_CFG)
    missing = tmp_path / "nope" / "model.safetensors"
    with pytest.raises(WeightsNotFoundError, match=re.escape(str(missing))):
        load_backbone(f"open_clip:{config}", weights=missing)
    with pytest.raises(WeightsNotFoundError, match="weights="):
        load_backbone("open_clip:ViT-B-32")  # weights are required


@pytest.mark.parametrize(
    ("spec", "attribute"),
    [("default", "DEFAULT_WEIGHTS_PATH"), ("circe-tiny", "TINY_WEIGHTS_PATH")],
)
def test_missing_shipped_weights_point_to_pretrain(tmp_path, monkeypatch, spec, attribute):
    absent = tmp_path / "shipped.safetensors"
    monkeypatch.setattr(backbones, attribute, absent)
    with pytest.raises(WeightsNotFoundError, match="circe pretrain") as err:
        load_backbone(spec)
    assert str(absent) in str(err.value)


@pytest.mark.parametrize("weights", ["openai", "laion2b_s34b_b79k", "hf-hub:timm/ViT-B-32"])
def test_pretrained_tags_and_hub_specs_are_refused(weights):
    with pytest.raises(ValueError, match="never downloads"):
        load_backbone("open_clip:ViT-B-32", weights=weights)


def test_hub_architectures_are_refused(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match="never downloads"):
        load_backbone("open_clip:hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", weights=weights)
    # a config whose tokenizer would come from the Hub (SigLIP's does)
    with pytest.raises(ValueError, match="Hugging Face Hub"):
        load_backbone("open_clip:ViT-B-16-SigLIP", weights=weights)


@pytest.mark.parametrize("spec", ["clip:ViT-B-32", "timm:vit", "nonsense", "open_clip:"])
def test_unknown_spec_lists_accepted_forms(spec):
    with pytest.raises(ValueError, match="open_clip:ARCH"):
        load_backbone(spec, weights="x.safetensors")


def test_unknown_architecture_name(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match="list_models"):
        load_backbone("open_clip:No-Such-Arch", weights=weights)


def test_weights_for_another_architecture_are_rejected(tmp_path):
    config, _, _ = _tiny_openclip(tmp_path, _unique(tmp_path, "a"), TINY_CFG)
    # The image tower wider: most of its tensors change shape.
    wider = {**TINY_CFG, "embed_dim": 48, "vision_cfg": {**TINY_CFG["vision_cfg"], "width": 96}}
    _, other_weights, _ = _tiny_openclip(tmp_path, _unique(tmp_path, "b"), wider)
    with pytest.raises(ValueError, match="does not fit") as caught:
        load_backbone(f"open_clip:{config}", weights=other_weights)
    # A count and the first few names, not every mismatched tensor of the model.
    assert re.search(
        r"\d+ tensors of another shape \([\w.]+, [\w.]+, [\w.]+, and \d+ more\)", str(caught.value)
    )
    assert len(str(caught.value)) < 500


@pytest.mark.parametrize("kind", ["safetensors cut short", "pt cut short", "text"])
def test_unreadable_weights_files_are_called_so(tmp_path, kind):
    config, weights, model = _tiny_openclip(tmp_path, _unique(tmp_path, "a"), TINY_CFG)
    if kind == "safetensors cut short":
        broken = tmp_path / "cut.safetensors"
        broken.write_bytes(weights.read_bytes()[:1000])
    elif kind == "pt cut short":
        whole = tmp_path / "whole.pt"
        torch.save(model.state_dict(), whole)
        broken = tmp_path / "cut.pt"
        broken.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    else:
        broken = tmp_path / "notes.bin"
        broken.write_text("these are not weights\n")
    with pytest.raises(CorruptWeightsError, match="is truncated or not a checkpoint") as caught:
        load_backbone(f"open_clip:{config}", weights=broken)
    assert str(broken) in str(caught.value) and len(str(caught.value)) < 500


def test_a_corrupt_transformers_directory_is_called_so(tmp_path):
    model_dir, *_ = _tiny_hf_clip_dir(tmp_path)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CorruptWeightsError, match="model.safetensors is truncated or not"):
        load_backbone(f"hf:{model_dir}")


def test_sha256_is_cached_per_path_mtime_size(tmp_path):
    f = tmp_path / "blob.bin"
    f.write_bytes(b"a" * 3_000_000)
    first = file_sha256(f)
    assert first == hashlib.sha256(b"a" * 3_000_000).hexdigest()
    assert file_sha256(f) == first
    f.write_bytes(b"b" * 3_000_000)  # same size, new content
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1_000_000))
    assert file_sha256(f) != first


# ------------------------------------------------------------------------------------------
# (d) Hugging Face transformers CLIP from a local directory
# ------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: the 256 base symbols of a byte-level BPE vocab."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    extra = [b for b in range(256) if b not in keep]
    codes = keep + [256 + i for i in range(len(extra))]
    return [chr(c) for c in codes]


def _tiny_hf_clip_dir(root: Path):
    """A random tiny CLIPModel + CLIPTokenizer (hand-written vocab) + image processor on disk."""
    transformers = pytest.importorskip("transformers")

    symbols = _bytes_to_unicode()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    for token in ("ca", "cat</w>", "<|startoftext|>", "<|endoftext|>"):
        vocab[token] = len(vocab)
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    tokenizer = transformers.CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"))

    config = transformers.CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    model_dir = root / "clip"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    processor.save_pretrained(model_dir)
    return model_dir, model, tokenizer, processor


def _features(out) -> torch.Tensor:
    # transformers 4.x returns a tensor, 5.x a model output with the projection in pooler_output
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_hf_clip_roundtrip_and_tokens(tmp_path):
    model_dir, model, tokenizer, processor = _tiny_hf_clip_dir(tmp_path)
    bb = load_backbone(f"hf:{model_dir}")
    assert isinstance(bb, Backbone) and not bb.training

    images = _images(2)
    pixels = torch.stack([bb.preprocess(im) for im in images])  # [2, 3, 32, 32]
    assert torch.equal(pixels, processor(images=images, return_tensors="pt")["pixel_values"])
    ids = bb.tokenize(TEXTS)  # [3, 16]
    ref = tokenizer(
        TEXTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt"
    )
    assert torch.equal(ids, ref["input_ids"])

    with torch.no_grad():
        image_ref = _features(model.get_image_features(pixel_values=pixels))
        text_ref = _features(
            model.get_text_features(input_ids=ids, attention_mask=ref["attention_mask"])
        )
        assert torch.equal(bb.encode_image(pixels), image_ref)
        assert torch.equal(bb.encode_text(ids), text_ref)

        pooled, seq, mask = bb.encode_image(pixels, tokens=True)
        assert torch.equal(pooled, image_ref)
        assert seq.shape == (2, 1 + 16, 32) and mask.shape == (2, 17) and mask.all()
        assert torch.allclose(model.visual_projection(seq[:, 0]), pooled, atol=1e-6)

        pooled_t, seq_t, mask_t = bb.encode_text(ids, tokens=True)
        assert torch.equal(pooled_t, text_ref)
        assert seq_t.shape == (3, 16, 32)
        assert torch.equal(mask_t, ref["attention_mask"].bool())  # pads are EOS ids too

    ident = bb.identity
    assert ident.spec == f"hf:{model_dir.resolve()}"
    assert ident.weights_sha256 == file_sha256(model_dir / "model.safetensors")
    assert (ident.image_size, ident.embed_dim) == (32, 16)


def test_hf_clip_weights_file_override(tmp_path):
    model_dir, model, _, _ = _tiny_hf_clip_dir(tmp_path)
    override = tmp_path / "finetuned.safetensors"
    with torch.no_grad():
        model.visual_projection.weight.mul_(2)
    _save_state_dict(model, override)

    bb = load_backbone(f"hf:{model_dir}", weights=override)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = _features(model.get_image_features(pixel_values=pixels))
        assert torch.equal(bb.encode_image(pixels), ref)
    assert bb.identity.weights == str(override.resolve())
    assert bb.identity.weights_sha256 == file_sha256(override)


def test_hf_clip_missing_directory_or_config(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(WeightsNotFoundError, match="never downloads"):
        load_backbone(f"hf:{tmp_path / 'absent'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsNotFoundError, match="config.json"):
        load_backbone(f"hf:{tmp_path / 'empty'}")


def test_hf_clip_without_its_tokenizer_is_refused(tmp_path):
    """`model.save_pretrained(DIR)` alone: transformers would build a 2-token tokenizer that
    gives every text the same ids; circe refuses the directory and says what is missing."""
    model_dir, *_ = _tiny_hf_clip_dir(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        (model_dir / name).unlink(missing_ok=True)
    (model_dir / "special_tokens_map.json").unlink(missing_ok=True)
    with pytest.raises(WeightsNotFoundError, match="no usable tokenizer.*neither vocab.json"):
        load_backbone(f"hf:{model_dir}")


def test_hf_clip_with_another_models_tokenizer_is_refused(tmp_path):
    """Tokenizer files that are there but belong to a model with a larger vocabulary."""
    model_dir, *_ = _tiny_hf_clip_dir(tmp_path)
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab.update({f"extra{i}</w>": 1000 + i for i in range(5)})  # ids past the tower's table
    (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(WeightsNotFoundError, match="more than the text tower's .* embeddings"):
        load_backbone(f"hf:{model_dir}")


def test_what_turns_inputs_into_tensors_is_part_of_the_identity_and_the_cache_key(tmp_path):
    """Same weights, another tokenizer, image processor or context length: another identity
    (`inputs_sha256`), so another feature-cache key and a refused index."""
    from circe.train.cache import FeatureCache

    model_dir, *_ = _tiny_hf_clip_dir(tmp_path)
    cache = FeatureCache(tmp_path / "cache")

    def keys():
        backbone = load_backbone(f"hf:{model_dir}")
        return backbone.identity, cache.key(backbone, "text:pooled", ["a", "b"])[0]

    identity, key = keys()
    assert identity.inputs_sha256
    assert keys() == (identity, key)  # stable
    seen = {key}
    # The tokenizer: one merge fewer (what "cat" splits into).
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    tokenizer["model"]["merges"] = tokenizer["model"]["merges"][1:]
    (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    changed, key = keys()
    assert changed.weights_sha256 == identity.weights_sha256 and key not in seen
    seen.add(key)
    # The image processor.
    config = json.loads((model_dir / "preprocessor_config.json").read_text())
    config["image_mean"] = [0.5, 0.5, 0.5]
    (model_dir / "preprocessor_config.json").write_text(json.dumps(config))
    _, key = keys()
    assert key not in seen
    seen.add(key)
    # The context length, through open_clip (the tokenizer pads to the model's context).
    short = {**TINY_CFG, "text_cfg": {**TINY_CFG["text_cfg"], "context_length": 12}}
    lengths = {}
    for name, config in (("long", TINY_CFG), ("short", short)):
        config_path, weights, _ = _tiny_openclip(tmp_path, f"ctx-{name}", config)
        backbone = load_backbone(f"open_clip:{config_path}", weights)
        lengths[name] = (backbone.tokenize(["a"]).shape[1], backbone.identity.inputs_sha256)
    assert lengths["long"][0] != lengths["short"][0]
    assert lengths["long"][1] != lengths["short"][1]


# ------------------------------------------------------------------------------------------
# (e) token sequences of the other image towers, and the refusal where there are none
# ------------------------------------------------------------------------------------------

TEXT_CFG = TINY_CFG["text_cfg"]
# SigLIP's image tower in miniature: a timm ViT without a class token, attention-pooled
# ("map"), no projection (so the embedding is the trunk's width, 192 for vit_tiny). timm
# builds it at its own input size, 224.
TIMM_CFG = {
    "embed_dim": 192,
    "vision_cfg": {
        "image_size": 224,
        "timm_model_name": "vit_tiny_patch16_224",
        "timm_model_pretrained": False,
        "timm_pool": "map",
        "timm_proj": "none",
    },
    "text_cfg": TEXT_CFG,
}
# An open_clip ModifiedResNet (RN50's kind) with one bottleneck per stage.
RESNET_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16},
    "text_cfg": TEXT_CFG,
}
# A CoCa-style tower that pools by attention over its tokens: no token sequence is read.
ATTENTION_POOLED_CFG = {
    **TINY_CFG,
    "vision_cfg": {**TINY_CFG["vision_cfg"], "attentional_pool": True, "attn_pooler_queries": 4},
}


@pytest.mark.parametrize(
    ("cfg", "tokens"),
    [(TIMM_CFG, 1 + (224 // 16) ** 2), (RESNET_CFG, 1 + (64 // 32) ** 2)],
    ids=["timm-siglip-like", "resnet"],
)
def test_timm_and_resnet_towers_give_token_sequences(tmp_path, cfg, tokens):
    """A summary token first (timm's ViT: its class token; the ResNet, which has none: the
    mean), then one per patch or map position; the pooled output is the plain forward's,
    exactly."""
    name = _unique(tmp_path, "towers")
    config, weights, model = _tiny_openclip(tmp_path, name, cfg)
    bb = load_backbone(f"open_clip:{config}", weights=weights)
    size = cfg["vision_cfg"]["image_size"]
    pixels = torch.randn(2, 3, size, size)
    with torch.no_grad():
        pooled, seq, mask = bb.encode_image(pixels, tokens=True)
        assert torch.equal(pooled, model.encode_image(pixels))
        assert seq.shape[:2] == (2, tokens) and mask.shape == (2, tokens) and mask.all()
        if "timm_model_name" in cfg["vision_cfg"]:
            assert torch.equal(seq, model.visual.trunk.forward_features(pixels))
        else:
            torch.testing.assert_close(seq[:, 0], seq[:, 1:].mean(dim=1))
            visual = model.visual
            feature_map = pixels
            for stage in (visual.stem, visual.layer1, visual.layer2, visual.layer3, visual.layer4):
                feature_map = stage(feature_map)  # [2, 512, 2, 2] at the end
            assert torch.equal(seq[:, 1:], feature_map.flatten(2).transpose(1, 2))
    (image_len, _), (text_len, _) = bb.token_shapes()
    assert (image_len, text_len) == (tokens, 16)

    from circe.methods import create_method

    method = create_method("far-net", bb).eval()
    with torch.no_grad():
        queries = method.encode_queries(pixels, ["a cat", "a red dog"])
    assert queries.shape == (2, cfg["embed_dim"])
    torch.testing.assert_close(queries.norm(dim=-1), torch.ones(2))


def test_a_token_method_on_a_tower_without_tokens_is_refused_before_any_data(tmp_path):
    from circe.backbones import TokensUnsupportedError
    from circe.methods import create_method
    from circe.train import TrainConfig, train

    config, weights, _ = _tiny_openclip(tmp_path, _unique(tmp_path, "coca"), ATTENTION_POOLED_CFG)
    bb = load_backbone(f"open_clip:{config}", weights=weights)
    with pytest.raises(
        TokensUnsupportedError, match=r"method far-net fuses .* backbone open_clip:"
    ):
        create_method("far-net", bb)
    # The trainer builds the method before it reads any data: a data root that does not
    # exist is never reached.
    run = TrainConfig(
        method="tmcir",
        backbone=f"open_clip:{config}",
        backbone_weights=str(weights),
        root=str(tmp_path / "no-data-here"),
    )
    with pytest.raises(ValueError, match="method tmcir fuses .*pools by attention"):
        train(run, tmp_path / "run", progress=False)


def test_a_timm_tower_without_a_class_token_gets_its_mean_in_front():
    """SigLIP's timm ViTs have no class token: the tokens' mean stands in front of the
    patches, and the pooled output is the tower's own forward."""
    from types import SimpleNamespace

    import timm

    from circe.backbones.openclip import OpenClipBackbone

    torch.manual_seed(0)
    trunk = timm.create_model(
        "vit_tiny_patch16_224", class_token=False, global_pool="avg", num_classes=0
    ).eval()
    visual = SimpleNamespace(trunk=trunk, head=torch.nn.Identity())
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        pooled, seq = OpenClipBackbone._timm_tokens(visual, pixels)
        assert torch.equal(pooled, trunk(pixels))
        assert seq.shape == (2, 1 + 14 * 14, 192)
        torch.testing.assert_close(seq[:, 0], seq[:, 1:].mean(dim=1))
        assert torch.equal(seq[:, 1:], trunk.forward_features(pixels))
