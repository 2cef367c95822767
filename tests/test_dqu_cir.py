"""DQU-CIR: query unification (caption template, words on the image), λ, fine-tuning."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from circe.data.keywords import KeywordFile, RuleKeywords
from circe.data.render import BACKGROUND
from circe.data.synthetic import SynthConfig, write_synthetic
from circe.data.types import RawQuery
from circe.methods import Batch, create_method, method_class, variant_of
from circe.methods.dqu_cir import fitted_unified_text, unified_image, unified_text
from circe.train.objective import ContrastiveObjective


@pytest.fixture
def dqu(tiny_backbone):
    torch.manual_seed(0)
    return create_method("dqu-cir", tiny_backbone)


def _query(text="make the circle red", caption="small blue circle center"):
    image = Image.new("RGB", (96, 96), BACKGROUND)
    return RawQuery(image, text, reference_id="img-1", query_id="q-1", caption=caption)


def test_registered_with_its_ablations(tiny_backbone):
    for name in ("dqu-cir", "dqu-cir-text-only", "dqu-cir-image-only", "dqu-cir-fixed"):
        assert method_class(name).trainable
        assert create_method(name, tiny_backbone).inputs.prepares_queries
        assert variant_of(name) == (None if name == "dqu-cir" else "dqu-cir")


def test_unified_text_follows_the_papers_template(dqu):
    assert unified_text("a red circle", "make it blue") == "a red circle, but make it blue"
    _, text = dqu.prepare_query(_query())
    assert text == "small blue circle center, but make the circle red"
    with pytest.raises(ValueError, match="modification text is empty"):
        dqu.prepare_query(_query(text="  "))
    with pytest.raises(ValueError, match="no caption for reference image 'img-1'"):
        dqu.prepare_query(_query(caption=None))


def test_words_are_written_where_the_text_goes():
    canvas = Image.new("RGB", (96, 96), BACKGROUND)

    def pixels(image):  # [H * W, 3]
        return torch.from_numpy(np.asarray(image, dtype=np.float32).reshape(-1, 3))

    empty, written = pixels(unified_image(canvas, "")), pixels(unified_image(canvas, "green"))
    assert torch.equal(empty, pixels(canvas))
    changed = (written != empty).any(dim=1).reshape(96, 96)  # [H, W]
    assert changed.any()
    rows = changed.any(dim=1).nonzero().flatten()
    assert rows.min() >= 96 * 0.6  # in the lower band, the picture above is untouched
    dark = (written.reshape(96, 96, 3).sum(-1) < 200) & changed  # black strokes of letters
    assert dark.sum() > 10
    # Different words, different pixels; the same words, the same pixels (deterministic).
    assert unified_image(canvas, "red").tobytes() != unified_image(canvas, "green").tobytes()
    assert unified_image(canvas, "red").tobytes() == unified_image(canvas, "red").tobytes()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("paint the small yellow circle green", "green"),
        ("change the colour of the red square to blue", "blue"),
        ("the diamond should be purple instead", "purple"),
        ("make the large red circle smaller", "small"),
        ("enlarge the blue diamond", "large"),
        ("turn the circle into a square", "square"),
        ("replace the red circle with a diamond", "diamond"),
        ("move the red circle to the top left", "top left"),
        ("put the triangle in the middle left instead", "middle left"),
        ("move the blue square at the bottom right to the middle right", "middle right"),
        ("is shiny and silver with shorter sleeves", "shiny, silver shorter sleeves"),
        ("add a small red circle in the top left", "small red circle top left"),
        (
            "there should also be a small green diamond in the bottom middle",
            "small green diamond bottom middle",
        ),
        ("get rid of the small blue diamond", "no small blue diamond"),
        ("has short sleeves and is red and has belt and is red", "short sleeves, red, belt"),
        ("has long heels and is black instead of white", "long heels, black"),
        ("change from red to blue", "blue"),
        ("the same please", "same"),
        # Free wording: request frames, "no longer X but Y", removals said of the object.
        ("could you dye the huge blue square red?", "red"),
        ("I'd like you to turn the square into a circle!", "circle"),
        ("the triangle is no longer small but large", "large"),
        (
            "the upper middle is no longer empty but holds a big orange diamond",
            "big orange diamond",
        ),
        ("the circle is no longer where it was but in the lower left spot", "lower left"),
        ("now with a diamond in place of the circle", "diamond"),
        ("the red circle should be gone", "no red circle"),
        ("same scene minus the purple triangle", "no purple triangle"),
        ("keep everything else, just shrink the yellow diamond", "small"),
        ("swap the huge blue square for a triangle", "triangle"),
    ],
)
def test_rule_keywords_keep_what_describes_the_target(text, words):
    assert RuleKeywords().extract(text) == words


def test_keyword_file_by_query_id_or_text(tmp_path):
    path = tmp_path / "keywords.json"
    path.write_text(json.dumps({"q-1": "red", "make it blue": ["make it blue", "blue"]}))
    words = KeywordFile(path)
    assert words.extract("anything", "q-1") == "red"
    assert words.extract("make it blue", "q-9") == "blue"
    with pytest.raises(KeyError, match="no key words for query 'q-2'"):
        words.extract("other", "q-2")


def test_lambda_is_in_the_open_interval_and_follows_the_input(dqu, tiny_backbone):
    dqu.eval()
    size = tiny_backbone.identity.image_size
    torch.manual_seed(1)
    pixels = torch.randn(4, 3, size, size)
    texts = ["a red circle, but make it blue", "a square, but remove it", "x, but y", "z, but w"]
    lam = dqu.text_share(pixels, texts)
    assert dqu.explain(pixels, texts)["lambda"] == lam.tolist()
    assert lam.shape == (4,) and ((lam > 0) & (lam < 1)).all()
    assert lam.std() > 0  # per query, not one constant
    fixed = create_method("dqu-cir-fixed", tiny_backbone, finetune="none", fixed_lambda=0.3)
    torch.testing.assert_close(fixed.text_share(pixels, texts), torch.full((4,), 0.3))
    text_only = create_method("dqu-cir-text-only", tiny_backbone, finetune="none")
    expected = torch.nn.functional.normalize(text_only.encode_texts(texts), dim=-1)
    torch.testing.assert_close(text_only.encode_queries(pixels, texts), expected)


def _grads(method, tiny_backbone):
    size = tiny_backbone.identity.image_size
    pixels = torch.randn(3, 3, size, size)
    texts = ["a, but make it red", "b, but remove the square", "c, but add a diamond"]
    objective = ContrastiveObjective(method, temperature=0.07, learn_temperature=False)
    objective(Batch(pixels, texts, torch.randn_like(pixels))).backward()
    backbone = method.backbone
    return {
        tower: any(
            p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.tower_parameters(tower)
        )
        for tower in ("image", "text")
    }


def test_gradients_reach_the_towers_that_are_fine_tuned(tiny_backbone):
    torch.manual_seed(0)
    text = create_method("dqu-cir", tiny_backbone, finetune="text")
    assert _grads(text, tiny_backbone) == {"image": False, "text": True}
    full = create_method("dqu-cir", tiny_backbone, finetune="full")
    assert _grads(full, tiny_backbone) == {"image": True, "text": True}
    assert full.backbone is not tiny_backbone  # fine-tuning works on a copy
    assert not any(p.requires_grad for p in tiny_backbone.parameters())
    frozen = create_method("dqu-cir", tiny_backbone, finetune="none")
    assert not frozen.inputs.trains
    assert not any(p.requires_grad for p in frozen.backbone.parameters())


def test_config_errors_are_clear(tiny_backbone):
    with pytest.raises(ValueError, match="lambda_mode"):
        create_method("dqu-cir", tiny_backbone, lambda_mode="adaptive")
    with pytest.raises(FileNotFoundError, match="captions file not found"):
        create_method("dqu-cir", tiny_backbone, captions="/nonexistent/captions.json")


def test_training_lowers_the_loss_and_the_checkpoint_reloads(tmp_path, tiny_weights):
    from circe.methods.checkpoint import load_trained_method
    from circe.train import TrainConfig, train

    root = write_synthetic(
        tmp_path / "synth", SynthConfig(train=96, val=24, test=24, test_unseen=12, image_size=32)
    )
    config_path, weights = tiny_weights
    config = TrainConfig(
        method="dqu-cir",
        root=str(root),
        backbone=f"open_clip:{config_path}",
        backbone_weights=str(weights),
        epochs=6,
        batch_size=32,
        lr=3e-3,
        backbone_lr=1e-3,
        warmup_steps=1,
        eval_every=0,
        test_splits=["test"],
        cache_dir=str(tmp_path / "cache"),
        threads=1,
    )
    result = train(config, tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    losses = [r["train_loss"] for r in records if r["kind"] == "epoch"]
    assert losses[-1] < losses[0]
    assert result.results["feature_cache"]["entries"] == 2  # images + prepared query images
    method = load_trained_method(tmp_path / "run" / "best")
    assert method.inputs.trains == {"text"} and method.config.finetune == "text"


def test_a_long_caption_is_cut_never_the_modification(default_backbone):
    """T_u must fit the text encoder's context; what gives way is the caption, from its end."""
    caption = ", ".join(f"a small red circle in the top left number {n}" for n in range(16))
    text = "could you erase the large blue square at the bottom right?"
    within = lambda t: len(t.split()) <= 32  # two parts of 10 words fit
    fitted = fitted_unified_text(caption, text, "{caption}, but {text}", within)
    assert fitted.endswith(text) and within(fitted)
    assert fitted.startswith("a small red circle in the top left number 0")
    assert fitted.count("number") == 2  # whole trailing parts dropped, not words
    # On the real tokenizer (circe-minilm: 128 tokens), the unified text then reaches it whole.
    assert not default_backbone.fits_context(f"{caption}, but {text}")
    fitted = fitted_unified_text(
        caption, text, "{caption}, but {text}", default_backbone.fits_context
    )
    assert fitted.endswith(text) and default_backbone.fits_context(fitted)
    # Short enough already: unchanged.
    assert fitted_unified_text("a red circle", "remove it", "{caption}, but {text}", within) == (
        "a red circle, but remove it"
    )
