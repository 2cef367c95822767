"""Shared fixtures: a tiny open_clip backbone built and saved by the tests themselves."""

import json

import pytest
import torch
from safetensors.torch import save_file

from circe.backbones import build_openclip_model, load_backbone
from circe.data.synthetic import SynthConfig, write_synthetic

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """(config path, weights path) of a randomly initialised tiny open_clip model."""
    folder = tmp_path_factory.mktemp("tiny-clip")
    config_path = folder / "tiny-clip.json"
    config_path.write_text(json.dumps(TINY_CONFIG))
    torch.manual_seed(0)
    model, _, _ = build_openclip_model(config_path)
    weights = folder / "tiny-clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    return config_path, weights


@pytest.fixture(scope="session")
def tiny_train_config(tiny_weights):
    """`make(root, cache_dir, **fields)`: a TrainConfig on the tiny backbone for the data set
    at `root`, features cached in `cache_dir`; every other field as given or default."""
    from circe.train.config import TrainConfig

    arch, weights = tiny_weights

    def make(root, cache_dir, **fields):
        return TrainConfig(
            backbone=f"open_clip:{arch}",
            backbone_weights=str(weights),
            root=str(root),
            cache_dir=str(cache_dir),
            **fields,
        )

    return make


@pytest.fixture(scope="session")
def tiny_backbone(tiny_weights):
    config_path, weights = tiny_weights
    return load_backbone(f"open_clip:{config_path}", weights)


@pytest.fixture(scope="session")
def default_backbone():
    """The shipped circe-minilm: its committed weights over the packaged language model."""
    return load_backbone("default")


@pytest.fixture(scope="session")
def tiny_language_model(tmp_path_factory):
    """A randomly initialised 2-layer BERT with a letter-level WordPiece vocabulary, saved as
    `save_pretrained` saves one: the text tower of tests that need no real language."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789,.?!'")
    words = ["the", "red", "blue", "circle", "square", "remove", "add", "left", "top"]
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(special + letters + [f"##{c}" for c in letters] + words)}
    # Built with `tokenizers` (BERT's normaliser, splitting and [CLS] ... [SEP]), saved as a
    # fast tokenizer: what transformers 4 and 5 both read back with AutoTokenizer.
    wordpiece = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.decoder = decoders.WordPiece()
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokens = dict(zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"), special))
    PreTrainedTokenizerFast(tokenizer_object=wordpiece, **tokens).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster, and steadier when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A tiny synthetic benchmark, one per test module (tests may add files to it)."""
    root = tmp_path_factory.mktemp("bench") / "synthetic"
    return write_synthetic(root, SynthConfig(train=96, val=24, test=24, test_unseen=8))
