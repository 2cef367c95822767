"""circe's image tower over a pretrained transformers text encoder (`lm:DIR`, the default
`circe-minilm`): shapes and masks, saving only what changed, refusing a file trained against
another language model, pretraining that resumes, and the packaged all-MiniLM-L6-v2 itself.
Everything but the last tests runs on a tiny random BERT the tests save."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from circe import backbones
from circe.backbones import WeightsNotFoundError, backbone_weights_sha256, load_backbone
from circe.backbones.language_model import LanguageModelBackbone, packaged_text_model
from circe.pretrain import PretrainConfig

ARCHITECTURE = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "context_length": 24,
}
TEXTS = ["remove the red circle", "add a blue square in the top left corner, please", ""]


def _untrained(text_dir, seed=0):
    torch.manual_seed(seed)
    return LanguageModelBackbone(text_dir, architecture=ARCHITECTURE)


def test_tokens_masks_and_pooling(tiny_language_model):
    bb = _untrained(tiny_language_model)
    ids = bb.tokenize(TEXTS)
    assert ids.shape == (3, 24)
    mask = bb.text_mask(ids)
    assert mask[2].sum() == 2  # "" -> [CLS] [SEP]
    assert bb.token_strings(ids[:1])[0][:2] == ["[CLS]", "remove"]
    with torch.no_grad():
        pooled, seq, seq_mask = bb.encode_text(ids, tokens=True)
        assert pooled.shape == (3, 16) and seq.shape == (3, 24, 32)
        assert torch.equal(seq_mask, mask)
        longest = int(mask.sum(dim=1).max())
        assert (seq[:, longest:] == 0).all()  # past the longest text: zeros, never computed
        # A text alone and the same text in a padded batch embed alike: padding is masked.
        alone = bb.encode_text(bb.tokenize(TEXTS[:1]))
        assert torch.allclose(alone, pooled[:1], atol=1e-5)
        # The pooled vector is the mean of the real tokens' states, projected.
        real = seq[0][mask[0]].mean(dim=0)
        assert torch.allclose(bb.text_projection(real), pooled[0], atol=1e-5)
        image, image_seq, image_mask = bb.encode_image(torch.randn(2, 3, 32, 32), tokens=True)
        assert image.shape == (2, 16) and image_seq.shape == (2, 1 + 16, 32) and image_mask.all()


def test_top_layers_run_from_cached_lower_states(tiny_language_model):
    """Pretraining caches the locked layers' output and runs only the top ones: the result
    must equal the whole model's, padding included."""
    bb = _untrained(tiny_language_model)
    ids = bb.tokenize(TEXTS)
    with torch.no_grad():
        full, mask = bb.text_states(ids)
        lower, lower_mask = bb.text_states(ids, layers=1)
        finished = bb.finish_text_states(lower, lower_mask, first_layer=1)
    assert torch.equal(mask, lower_mask)
    assert torch.allclose(finished[mask], full[mask], atol=1e-5)


def test_save_keeps_only_what_changed_and_loads_back(tiny_language_model, tmp_path):
    bb = _untrained(tiny_language_model)
    out = tmp_path / "w.safetensors"
    bb.save(out)
    assert not [k for k in load_file(out) if k.startswith("text.")]  # the LM's own, unchanged
    loaded = load_backbone(f"lm:{tiny_language_model}", weights=out)
    pixels, ids = torch.randn(2, 3, 32, 32), bb.tokenize(TEXTS)
    with torch.no_grad():
        # fp16 on disk: equal to what the saved half-precision tensors give
        assert torch.allclose(loaded.encode_image(pixels), bb.encode_image(pixels), atol=2e-2)
        assert torch.allclose(loaded.encode_text(ids), bb.encode_text(ids), atol=2e-2)
    assert loaded.identity.weights_sha256 == backbone_weights_sha256(
        f"lm:{tiny_language_model}", out
    )

    # A fine-tuned top layer is saved and read back; the untouched ones still are not.
    with torch.no_grad():
        bb.text.encoder.layer[1].output.dense.weight.add_(0.5)
    bb.save(out)
    saved = [k for k in load_file(out) if k.startswith("text.")]
    assert saved == ["text.encoder.layer.1.output.dense.weight"]
    again = load_backbone(f"lm:{tiny_language_model}", weights=out)
    assert torch.allclose(
        again.text.encoder.layer[1].output.dense.weight,
        bb.text.encoder.layer[1].output.dense.weight.half().float(),
    )


def test_weights_trained_against_another_language_model_are_refused(tiny_language_model, tmp_path):
    out = tmp_path / "w.safetensors"
    _untrained(tiny_language_model).save(out)
    other = tmp_path / "other-bert"
    shutil.copytree(tiny_language_model, other)
    from transformers import BertModel

    changed = BertModel.from_pretrained(other)
    with torch.no_grad():
        changed.embeddings.word_embeddings.weight.mul_(2)
    changed.save_pretrained(other)
    with pytest.raises(ValueError, match="trained against a text tower"):
        load_backbone(f"lm:{other}", weights=out)


def test_missing_files_give_one_line_errors(tiny_language_model, tmp_path):
    with pytest.raises(WeightsNotFoundError, match="no language model at"):
        load_backbone(f"lm:{tmp_path / 'absent'}", weights=tmp_path / "w.safetensors")
    with pytest.raises(WeightsNotFoundError, match="weights="):
        load_backbone(f"lm:{tiny_language_model}")
    with pytest.raises(WeightsNotFoundError, match="weights file not found"):
        load_backbone(f"lm:{tiny_language_model}", weights=tmp_path / "absent.safetensors")
    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_language_model / name, bare / name)
    with pytest.raises(WeightsNotFoundError, match="tokenizer"):
        _untrained(bare)
    not_ours = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, not_ours)
    with pytest.raises(ValueError, match="architecture record"):
        load_backbone(f"lm:{tiny_language_model}", weights=not_ours)


def test_config_refusals():
    with pytest.raises(ValueError, match="paraphrase"):
        PretrainConfig(paraphrase_batch=8)
    with pytest.raises(ValueError, match="backbone must be one of"):
        PretrainConfig(backbone="circe-huge")


# -- the packaged all-MiniLM-L6-v2 ---------------------------------------------------------


@torch.no_grad()
def test_packaged_language_model_knows_synonyms_no_generator_taught_it():
    """The point of the default backbone: its language model puts a removal verb that no
    circe training text uses next to the one they use, before any training of ours."""
    bb = LanguageModelBackbone(
        packaged_text_model(), architecture=json.loads(backbones.MINILM_CONFIG_PATH.read_text())
    )

    def sentence(text):
        states, mask = bb.text_states(bb.tokenize([text]))
        return torch.nn.functional.normalize(bb.mean_pool(states, mask), dim=-1)[0]

    remove = sentence("remove the red circle")
    assert remove @ sentence("discard the red circle") > remove @ sentence(
        "paint the red circle blue"
    )
    assert remove @ sentence("discard the red circle") > 0.8  # measured 0.89
