"""Captions for DQU-CIR: a local Hugging Face BLIP model the test builds, the resumable
caption file, and `circe caption` end to end."""

import json

import pytest
import torch
from typer.testing import CliRunner

from circe.cli import app
from circe.data.captions import CaptionFile, HFCaptioner, caption_gallery, read_captions
from circe.data.synthetic import SynthConfig, load_synthetic, write_synthetic
from circe.data.types import DatasetFormatError

transformers = pytest.importorskip("transformers")

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "red", "circle", "square"]


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    """A tiny randomly initialised BLIP captioner + processor, saved like a real one. Its
    language-model bias favours "red", so it says something and never stops early."""
    folder = tmp_path_factory.mktemp("tiny-blip")
    # transformers 5 takes the vocabulary as a dict; 4.x reads it from a vocab.txt file.
    try:
        tokenizer = transformers.BertTokenizer(vocab={word: i for i, word in enumerate(WORDS)})
    except TypeError:  # 4.x: vocab_file is required
        tokenizer = None
    if tokenizer is None or len(tokenizer) != len(WORDS):
        (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
        tokenizer = transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    tokenizer.bos_token = "[DEC]"
    special = {"bos_token_id": 5, "pad_token_id": 0, "sep_token_id": 3, "eos_token_id": 3}
    layers = {"intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = transformers.BlipConfig(
        text_config={
            "vocab_size": len(WORDS),
            "hidden_size": 16,
            "max_position_embeddings": 32,
            **layers,
            **special,
        },
        vision_config={"hidden_size": 16, "image_size": 32, "patch_size": 8, **layers},
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = transformers.BlipForConditionalGeneration(config)
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[WORDS.index("red")] += 50.0
    model.save_pretrained(folder)
    image_processor = transformers.BlipImageProcessor(size={"height": 32, "width": 32})
    transformers.BlipProcessor(
        image_processor=image_processor, tokenizer=tokenizer
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("captions") / "synthetic"
    write_synthetic(root, SynthConfig(train=4, val=2, test=5, test_unseen=2))
    return root, load_synthetic(root, "test")


def test_the_hf_captioner_decodes_words(blip_dir):
    from PIL import Image

    captioner = HFCaptioner(blip_dir, max_new_tokens=4)
    captions = captioner([Image.new("RGB", (40, 40), "red"), Image.new("RGB", (64, 30), "blue")])
    assert captions == ["red red red red"] * 2


def test_captioning_resumes_without_redoing_finished_images(blip_dir, split, tmp_path):
    _, data = split
    captioner = HFCaptioner(blip_dir, max_new_tokens=3)
    seen: list[int] = []

    def interrupted(images):
        seen.append(len(images))
        if len(seen) == 2:
            raise KeyboardInterrupt  # the user stops the run during the second batch
        return captioner(images)

    out = tmp_path / "captions.json"
    with pytest.raises(KeyboardInterrupt):
        caption_gallery(data.gallery, interrupted, out, batch_size=2, save_every=1)
    assert len(read_captions(out)) == 2  # the first batch was saved

    calls: list[int] = []

    def counting(images):
        calls.append(len(images))
        return captioner(images)

    captions = caption_gallery(data.gallery, counting, out, batch_size=2)
    assert sum(calls) == len(data.gallery) - 2  # only the missing images
    assert set(captions) == set(data.gallery.ids)
    assert CaptionFile(out).caption(data.gallery.ids[0]) == "red red red"


def test_circe_caption_writes_the_file_dqu_cir_reads(blip_dir, split, tmp_path):
    root, data = split
    out = tmp_path / "out" / "captions.json"
    args = ["caption", "--model", str(blip_dir), "--out", str(out), "--root", str(root)]
    result = CliRunner().invoke(app, [*args, "--max-new-tokens", "2", "--batch-size", "3"])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text()) == {i: "red red" for i in data.gallery.ids}
    no_model = ["caption", "--model", str(tmp_path), "--out", str(out), "--root", str(root)]
    missing = CliRunner().invoke(app, no_model)
    assert missing.exit_code == 2 and "no config.json" in missing.output


def test_a_malformed_captions_file_names_the_entry(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"img-1": "a red circle", "img-2": ""}))
    with pytest.raises(DatasetFormatError, match="img-2"):
        read_captions(path)
    path.write_text("[1, 2]")
    with pytest.raises(DatasetFormatError, match="JSON object"):
        read_captions(path)
