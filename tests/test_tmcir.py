"""TMCIR: pseudo-target generation (scene editor, diffusers, a directory), the two training
stages through the trainer, and the adaptive token weights."""

import json
import shutil

import pytest
import torch
from PIL import Image, ImageChops
from typer.testing import CliRunner

from circe.cli import app
from circe.data.synthetic import scene_from_json
from circe.methods import create_method
from circe.methods.checkpoint import load_checkpoint, load_trained_method
from circe.methods.inputs import TokenFeatures
from circe.pseudo_targets.generate import create_generator, generate_pseudo_targets
from circe.pseudo_targets.manifest import ID_PREFIX, PseudoTargets, with_pseudo_targets
from circe.pseudo_targets.scene_editor import MISTAKES
from circe.train.data import load_split
from circe.train.runlog import read_log
from circe.train.trainer import train


def scene_editor_targets(bench, out, noise, limit=None):
    split = load_split("synthetic", bench, "train")
    editor = create_generator("scene-editor", "synthetic", bench, noise=noise, seed=0)
    generate_pseudo_targets(split, editor, out, "synthetic", limit)
    return split, PseudoTargets.load(out)


def scenes(bench):
    return {
        i: scene_from_json(s)
        for i, s in json.loads((bench / "annotations.json").read_text())["scenes"].items()
    }


# -- the scene editor -------------------------------------------------------------------------


def test_scene_editor_applies_the_parsed_edit_but_never_draws_the_target(bench, tmp_path):
    split, pseudo = scene_editor_targets(bench, tmp_path / "clean", noise=0.0)
    known = scenes(bench)
    assert len(pseudo.records) == len(split.queries) == 96
    for query in split.queries:
        record = pseudo.records[query.query_id]
        assert record["mistake"] == "none" and record["edit"] == query.tags[0]
        # The right scene (the text read against the reference scene) ...
        assert scene_from_json(record["scene"]) == known[query.target_ids[0]]
    # ... redrawn: never the target image itself.
    for query in split.queries[:10]:
        drawn = Image.open(pseudo.path(query.query_id)).convert("RGB")
        target = split.gallery.open(query.target_ids[0])
        assert drawn.size == target.size
        assert ImageChops.difference(drawn, target).getbbox() is not None


@pytest.mark.parametrize("noise", [0.3, 0.6])
def test_scene_editor_mistakes_at_the_set_rate_and_never_hit_the_target(bench, tmp_path, noise):
    split, pseudo = scene_editor_targets(bench, tmp_path / "noisy", noise)
    known = scenes(bench)
    mistaken = [r for r in pseudo.records.values() if r["mistake"] != "none"]
    assert len(mistaken) == round(noise * 96)  # exactly the rate
    assert {r["mistake"] for r in mistaken} == set(MISTAKES)
    targets = {q.query_id: known[q.target_ids[0]] for q in split.queries}
    for record in pseudo.records.values():
        hit = scene_from_json(record["scene"]) == targets[record["query_id"]]
        assert hit == (record["mistake"] == "none"), record


def test_pseudo_targets_replace_the_training_targets(bench, tmp_path):
    split, _ = scene_editor_targets(bench, tmp_path / "some", noise=0.3, limit=40)
    with pytest.raises(ValueError, match="cover 40 of the 96 queries.*again"):
        with_pseudo_targets(split, tmp_path / "some")
    # A crash mid-append cuts the last record short; a lost image leaves a dangling record.
    with (tmp_path / "some" / "manifest.jsonl").open("a") as manifest:
        manifest.write('{"query_id": "train-q000')
    lost = PseudoTargets.load(tmp_path / "some").path(split.queries[3].query_id)
    lost.unlink()
    scene_editor_targets(bench, tmp_path / "some", noise=0.3)  # resumes, finishes
    assert lost.is_file()
    swapped = with_pseudo_targets(split, tmp_path / "some")
    for old, new in zip(split.queries, swapped.queries, strict=True):
        assert new.target_ids == (ID_PREFIX + old.query_id,)
        assert new.reference_id == old.reference_id and new.texts == old.texts
        assert swapped.gallery.paths[new.target_ids[0]].is_file()
    swapped.check()
    with pytest.raises(ValueError, match="made for split 'train', not 'val'"):
        with_pseudo_targets(load_split("synthetic", bench, "val"), tmp_path / "some")


def test_cli_makes_resumes_and_refuses_mismatched_settings(bench, tmp_path):
    runner = CliRunner()
    command = [
        "pseudo-targets",
        *("--dataset", "synthetic", "--root", str(bench), "--generator", "scene-editor"),
        *("--out", str(tmp_path / "p"), "--noise", "0.3"),
    ]
    first = runner.invoke(app, [*command, "--limit", "10"])
    assert first.exit_code == 0, first.output
    assert "10 pseudo-targets made, 0 already there" in first.output
    second = runner.invoke(app, command)
    assert second.exit_code == 0 and "86 pseudo-targets made, 10 already there" in second.output
    other = runner.invoke(app, [*command[:-1], "0.6"])
    assert other.exit_code == 2 and "noise" in other.output and "another --out" in other.output
    stray = runner.invoke(app, [*command, "--source", str(tmp_path)])
    assert stray.exit_code == 2 and "--source does not apply" in stray.output


def test_a_directory_of_pseudo_targets_made_elsewhere(bench, tmp_path):
    split = load_split("synthetic", bench, "train")
    source = tmp_path / "made-elsewhere"
    source.mkdir()
    for query in split.queries[:5]:
        Image.new("RGB", (20, 10), "red").save(source / f"{query.query_id}.jpg")
    importer = create_generator("directory", "synthetic", bench, source=source)
    generate_pseudo_targets(split, importer, tmp_path / "p", "synthetic", limit=5)
    pseudo = PseudoTargets.load(tmp_path / "p")
    assert len(pseudo.records) == 5
    assert Image.open(pseudo.path(split.queries[0].query_id)).size == (20, 10)
    with pytest.raises(FileNotFoundError, match=split.queries[5].query_id):
        generate_pseudo_targets(split, importer, tmp_path / "p", "synthetic", limit=6)


# -- diffusers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    """A randomly initialised InstructPix2Pix pipeline a few hundred kB large, with a
    character-level CLIP tokenizer written here: nothing is downloaded."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tiny-pix2pix")
    # The CLIP BPE's byte alphabet (printable bytes as themselves, the others shifted past
    # 255), each symbol alone and word-final, and no merges: one token per character.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    shifted = [b for b in range(256) if b not in printable]
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(shifted))]
    tokens = [*symbols, *(s + "</w>" for s in symbols), "<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16
    )
    torch.manual_seed(0)
    end = vocab["<|endoftext|>"]
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=end,
            pad_token_id=end,
        )
    )
    small = {"block_out_channels": (8, 16), "norm_num_groups": 4}
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=8,  # the noisy latents and the reference image's latents
        out_channels=4,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        **small,
    )
    vae = diffusers.AutoencoderKL(
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        **small,
    )
    pipeline = diffusers.StableDiffusionInstructPix2PixPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=diffusers.EulerAncestralDiscreteScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder / "model")
    return folder / "model"


@pytest.mark.slow
def test_diffusers_pipeline_end_to_end_and_resume(bench, tiny_pipeline, tmp_path, monkeypatch):
    from circe.pseudo_targets.diffusion import DiffusionEditor

    split, out = load_split("synthetic", bench, "train"), tmp_path / "pix2pix"
    settings = {"model_dir": tiny_pipeline, "steps": 2, "resolution": 16, "batch_size": 3}
    editor = create_generator("diffusers", "synthetic", bench, device="cpu", **settings)
    edited_queries, interrupt_after = [], [6]
    real_edit = DiffusionEditor.edit

    def edit(self, queries, gallery):
        if len(edited_queries) == interrupt_after[0]:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-run
        edited_queries.extend(q.query_id for q in queries)
        return real_edit(self, queries, gallery)

    monkeypatch.setattr(DiffusionEditor, "edit", edit)
    with pytest.raises(KeyboardInterrupt):
        generate_pseudo_targets(split, editor, out, "synthetic", limit=10)
    first = PseudoTargets.load(out)
    assert sorted(first.records) == sorted(edited_queries)  # two whole batches survived
    stamps = {q: first.path(q).stat().st_mtime_ns for q in first.records}

    edited_queries.clear()
    interrupt_after[0] = None
    report = generate_pseudo_targets(split, editor, out, "synthetic", limit=10)
    assert (report.made, report.kept) == (4, 6)
    assert set(edited_queries).isdisjoint(stamps)  # nothing finished was made again
    done = PseudoTargets.load(out)
    assert sorted(done.records) == sorted(q.query_id for q in split.queries[:10])
    assert all(done.path(q).stat().st_mtime_ns == t for q, t in stamps.items())
    for query_id in done.records:
        assert Image.open(done.path(query_id)).size == (128, 128)  # the reference's size
    assert done.header["settings"]["pipeline"] == "StableDiffusionInstructPix2PixPipeline"
    assert done.records[query_id]["generator"] == "diffusers"


def test_diffusers_errors_name_the_fix(bench, tmp_path):
    with pytest.raises(ValueError, match="--model-dir"):
        create_generator("diffusers", "synthetic", bench)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        create_generator("diffusers", "synthetic", bench, model_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown generator 'pix2pix'"):
        create_generator("pix2pix", "synthetic", bench)


# -- the two stages through the trainer -------------------------------------------------------


@pytest.fixture
def config(bench, tiny_train_config, tmp_path):
    return tiny_train_config(
        bench,
        tmp_path / "cache",
        method="tmcir",
        epochs=3,
        batch_size=16,
        lr=2e-3,
        backbone_lr=1e-3,
        warmup_steps=2,
        log_every=1,
        eval_every=0,
        test_splits=["test"],
        eval_batch_size=64,
    )


def epoch_losses(run_dir):
    return [record["train_loss"] for record in read_log(run_dir, "epoch")]


def text_tower(backbone):
    return [p.detach().clone() for p in backbone.tower_parameters("text")]


def test_stage1_then_stage2_through_the_trainer(config, bench, tiny_backbone, tmp_path):
    scene_editor_targets(bench, tmp_path / "pseudo", noise=0.3)
    stage1 = config.replace(method_config={"stage": 1, "pseudo_targets": str(tmp_path / "pseudo")})
    first = train(stage1, tmp_path / "stage1", progress=False)
    losses = epoch_losses(first.run_dir)
    assert losses[-1] < losses[0]
    assert first.results["feature_cache"]["used"]  # images (pseudo-targets too) are cached
    aligned = load_trained_method(first.run_dir / "best")
    assert aligned.config.stage == 1 and aligned.explain(torch.zeros(1, 3, 32, 32), ["a"]) == {}
    changed = {
        id(after)
        for before, after in zip(
            tiny_backbone.parameters(), aligned.backbone.parameters(), strict=True
        )
        if not torch.equal(before, after)
    }
    assert changed and changed <= {id(p) for p in aligned.backbone.tower_parameters("text")}

    stage2 = config.replace(method_config={"init_from": str(first.run_dir / "best")}, lr=5e-3)
    shared = text_tower(tiny_backbone)
    method = create_method("tmcir", tiny_backbone, **stage2.method_config)
    for a, b in zip(text_tower(method.backbone), text_tower(aligned.backbone), strict=True):
        assert torch.equal(a, b)  # stage 2 starts from stage 1's text tower ...
    for a, b in zip(text_tower(tiny_backbone), shared, strict=True):
        assert torch.equal(a, b)  # ... in its own copy of the backbone
    second = train(stage2, tmp_path / "stage2", progress=False)
    losses = epoch_losses(second.run_dir)
    assert losses[-1] < losses[0]

    # The stage-2 checkpoint stands alone: stage 1 may be gone.
    stage1_best = load_checkpoint(first.run_dir / "best").path
    shutil.rmtree(first.run_dir)
    trained = load_trained_method(second.run_dir / "best")
    saved = load_checkpoint(second.run_dir / "best").info["method_config"]
    assert saved["init_from"] is None and saved["initialised_from"] == str(stage1_best)
    size = tiny_backbone.identity.image_size
    pixels, texts = torch.randn(2, 3, size, size), ["make the circle red", "remove the square"]
    with torch.no_grad():
        queries = trained.encode_queries(pixels, texts)
    torch.testing.assert_close(queries.norm(dim=-1), torch.ones(2))
    assert not any(
        torch.equal(a, b)
        for a, b in zip(text_tower(trained.backbone), text_tower(tiny_backbone), strict=True)
    )


def test_configuration_mistakes_get_clear_errors(config, tiny_backbone, tmp_path):
    with pytest.raises(ValueError, match="init_from is stage 2's"):
        create_method("tmcir", tiny_backbone, stage=1, init_from="x")
    with pytest.raises(ValueError, match="pseudo_targets are stage 1's"):
        create_method("tmcir", tiny_backbone, pseudo_targets="x")
    with pytest.raises(ValueError, match="finetune_text: false"):
        create_method("tmcir", tiny_backbone, init_from="x", finetune_text=False)
    with pytest.raises(ValueError, match="circe pseudo-targets"):
        train(config.replace(method_config={"stage": 1}), tmp_path / "run", progress=False)
    combiner = train(config.replace(method="combiner", max_steps=1), tmp_path / "c", False)
    with pytest.raises(ValueError, match="TMCIR stage-1 run"):
        create_method("tmcir", tiny_backbone, init_from=str(combiner.run_dir / "last"))


# -- adaptive token weights -------------------------------------------------------------------


def randomised(method):
    """Every trained weight random: the scorer and output layer start at zero, which would
    hide the token weighting from a test."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in method.named_parameters():
            if name.startswith("fusion."):
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return method.eval()


def token_inputs(method, texts):
    size = method.backbone.identity.image_size
    pixels = torch.randn(len(texts), 3, size, size, generator=torch.Generator().manual_seed(0))
    return method.backbone_image_tokens(pixels), method.backbone_text_tokens(texts)


def test_token_weights_are_a_distribution_over_the_real_tokens(tiny_backbone):
    method = randomised(create_method("tmcir-token-weights", tiny_backbone))
    texts = ["make the small red circle large", "remove it"]
    image, text = token_inputs(method, texts)
    with torch.no_grad():
        fused = method.fusion(image, text)
    n = image.tokens.shape[1]
    mask = torch.cat([image.mask, text.mask], dim=1)
    torch.testing.assert_close(fused.weights.sum(dim=1), torch.ones(2))
    assert (fused.weights[mask] > 0).all() and (fused.weights[mask] < 1).all()
    assert (fused.weights[~mask] == 0).all()  # padding gets nothing
    torch.testing.assert_close(fused.image_share, fused.weights[:, :n].sum(dim=1))
    assert fused.weights[0, n:].std() > 1e-4  # learned weights differ from token to token
    # Padding changes nothing: other values there give the very same query.
    scrambled = text.tokens.clone()
    scrambled[~text.mask] = torch.randn(int((~text.mask).sum()), scrambled.shape[-1])
    with torch.no_grad():
        again = method.fusion(image, TokenFeatures(text.pooled, scrambled, text.mask))
    torch.testing.assert_close(again.query, fused.query)
    torch.testing.assert_close(again.weights, fused.weights)


def test_mean_pooling_halves_the_weight_between_the_modalities(tiny_backbone):
    texts = ["make the small red circle large", "remove it"]
    mean = randomised(create_method("tmcir-mean-pool", tiny_backbone))
    assert mean.fusion.scorer is None
    image, text = token_inputs(mean, texts)
    n = image.tokens.shape[1]
    with torch.no_grad():
        weights = mean.fusion(image, text).weights
    count = text.mask.sum(dim=1, keepdim=True)
    torch.testing.assert_close(weights[:, :n], torch.full_like(weights[:, :n], 0.5 / n))
    expected = torch.where(text.mask, 0.5 / count, torch.zeros_like(weights[:, n:]))
    torch.testing.assert_close(weights[:, n:], expected)
    # A new TMCIR starts as mean pooling (its scorer's last layer is zero).
    with torch.no_grad():
        start = create_method("tmcir-token-weights", tiny_backbone).fusion(image, text).weights
    torch.testing.assert_close(start, weights)


def test_explain_names_each_token_with_its_weight(tiny_backbone):
    method = randomised(create_method("tmcir-token-weights", tiny_backbone))
    size = tiny_backbone.identity.image_size
    texts = ["make the circle red", "add a small blue square"]
    report = method.explain(torch.randn(2, 3, size, size), texts)
    for row, text in enumerate(texts):
        tokens = report["text_tokens"][row]
        assert [t for t, _ in tokens[1:-1]] == text.split()  # start and end tokens around
        patches = torch.tensor(report["image_patch_weights"][row])
        assert patches.shape == (4, 4)  # 32 px in 8 px patches
        total = sum(w for _, w in tokens) + report["image_class_weight"][row] + patches.sum()
        assert abs(total - 1) < 1e-5
        assert abs(report["image_share"][row] + report["text_share"][row] - 1) < 1e-6
        assert abs(report["text_share"][row] - sum(w for _, w in tokens)) < 1e-5


# -- the token merge --------------------------------------------------------------------------


def test_the_merge_folds_the_patches_most_like_a_word_into_it(tiny_backbone):
    method = randomised(create_method("tmcir", tiny_backbone, merge_ratio=0.25))
    fusion = method.fusion
    texts = ["make the small red circle large", "remove it"]
    image, text = token_inputs(method, texts)
    with torch.no_grad():
        fused = fusion(image, text)
    n = image.tokens.shape[1]
    merged = fused.merged_into  # [B, N]: word index or -1
    assert fusion.merged_patches == round(0.25 * (n - 1))
    assert ((merged >= 0).sum(dim=1) == fusion.merged_patches).all()
    assert (merged[:, 0] == -1).all()  # the class token stays
    for row in range(2):  # patches merge into real words only, and leave the weighting
        words = merged[row][merged[row] >= 0]
        assert text.mask[row, words].all()
        assert (fused.weights[row, :n][merged[row] >= 0] == 0).all()
    torch.testing.assert_close(fused.weights.sum(dim=1), torch.ones(2))

    # On states made by hand: the patch that is a copy of word 2 is the one merged, into word
    # 2, and with weight 1 a copy changes nothing; an opposite patch is not merged.
    d = fusion.image_positions.shape[1]
    generator = torch.Generator().manual_seed(3)
    image_states, text_states = torch.randn(1, 5, d, generator=generator), torch.randn(1, 4, d)
    image_states[0, 3] = text_states[0, 2]
    image_states[0, 1] = -text_states[0, 2]
    mask = torch.ones(1, 9, dtype=torch.bool)
    fusion.merged_patches = 1
    states, kept, into = fusion.merge(torch.cat([image_states, text_states], 1), mask, 5)
    assert into.tolist() == [[-1, -1, -1, 2, -1]]
    assert kept[0, :5].tolist() == [True, True, True, False, True]
    torch.testing.assert_close(states[0, 5 + 2], text_states[0, 2])
    torch.testing.assert_close(states[0, 5:7], text_states[0, :2])  # other words untouched


def test_the_merge_is_position_aware_and_the_weighting_alone_is_not(tiny_backbone):
    texts = ["move the red circle to the top left", "make the square blue"]
    for name, changes in (("tmcir", True), ("tmcir-token-weights", False)):
        method = randomised(create_method(name, tiny_backbone))
        image, text = token_inputs(method, texts)
        tokens = image.tokens.clone()
        order = torch.randperm(tokens.shape[1] - 1, generator=torch.Generator().manual_seed(0))
        tokens[:, 1:] = tokens[:, order + 1]  # the same patches in other places
        with torch.no_grad():
            query = method.fusion(image, text).query
            shuffled = method.fusion(TokenFeatures(image.pooled, tokens, image.mask), text).query
        assert (not torch.allclose(query, shuffled, atol=1e-5)) == changes, name


def test_stage1_aligns_the_text_alone_and_can_train_the_image_tower(
    config, bench, tiny_backbone, tmp_path
):
    text_only = create_method("tmcir", tiny_backbone, stage=1)
    composed = create_method("tmcir-composed-alignment", tiny_backbone, stage=1)
    size = tiny_backbone.identity.image_size
    pixels, texts = torch.randn(2, 3, size, size), ["make the circle red", "remove the square"]
    with torch.no_grad():
        query = text_only.encode_queries(pixels, texts)
        torch.testing.assert_close(query, text_only.encode_queries(torch.zeros_like(pixels), texts))
        assert not torch.allclose(query, composed.encode_queries(pixels, texts))

    scene_editor_targets(bench, tmp_path / "pseudo", noise=0.3)
    stage1 = config.replace(
        epochs=1,
        method_config={
            "stage": 1,
            "pseudo_targets": str(tmp_path / "pseudo"),
            "finetune_image": True,
        },
    )
    first = train(stage1, tmp_path / "stage1", progress=False)
    assert not first.results["feature_cache"]["used"]  # a trained image tower takes pixels
    aligned = load_trained_method(first.run_dir / "best")
    image_tower = list(aligned.backbone.tower_parameters("image"))
    before = list(tiny_backbone.tower_parameters("image"))
    assert any(not torch.equal(a, b) for a, b in zip(image_tower, before, strict=True))
    # Stage 2 from it must train the image tower too: its cached features would be stale.
    with pytest.raises(ValueError, match="finetune_image: true"):
        create_method("tmcir", tiny_backbone, init_from=str(first.run_dir / "best"))
    second = create_method(
        "tmcir", tiny_backbone, init_from=str(first.run_dir / "best"), finetune_image=True
    )
    for a, b in zip(second.backbone.tower_parameters("image"), image_tower, strict=True):
        assert torch.equal(a, b)


def test_a_checkpoint_saved_before_the_merge_loads_as_the_first_design(config, tmp_path):
    run = train(
        config.replace(max_steps=1, method_config={"merge": False}), tmp_path / "run", False
    )
    best = load_checkpoint(run.run_dir / "last").path  # the checkpoint directory itself
    size = 32
    pixels, texts = torch.randn(2, 3, size, size), ["make the circle red", "remove the square"]
    with torch.no_grad():
        expected = load_trained_method(best).encode_queries(pixels, texts)
    # What a checkpoint written before the merge and the text-alone stage 1 holds:
    info = json.loads((best / "config.json").read_text())
    for added in ("merge", "merge_ratio", "alignment", "finetune_image"):
        del info["method_config"][added]
    (best / "config.json").write_text(json.dumps(info))
    old = load_trained_method(best)
    assert not old.config.merge and old.config.alignment == "composed"
    with torch.no_grad():
        torch.testing.assert_close(old.encode_queries(pixels, texts), expected)
