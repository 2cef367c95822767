"""DWC: the soft-similarity labels, the mutual learning loss, the two streams, the schedule."""

import pytest
import torch
import torch.nn.functional as F

from circe.data.synthetic import SynthConfig, write_synthetic
from circe.methods import create_method
from circe.methods.base import TrainingState, contrastive_loss
from circe.methods.inputs import Pairs
from circe.methods.losses import (
    mutual_learning_loss,
    soft_label_contrastive_loss,
    soft_similarity_labels,
)
from circe.train.config import TrainConfig
from circe.train.data import load_split
from circe.train.runlog import read_log
from circe.train.trainer import train


def unit(rows: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    return F.normalize(
        torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=-1
    )


def test_soft_labels_are_distributions_that_share_mass_between_duplicate_targets():
    targets = unit(5)
    targets[3] = targets[1]  # one target image twice in the batch
    hard = soft_similarity_labels(targets, 0.0, 0.05)
    torch.testing.assert_close(hard.sum(dim=1), torch.ones(5))
    assert hard[1, 1] == hard[1, 3] == 0.5 and hard[0, 0] == 1.0  # copies are both positives
    soft = soft_similarity_labels(targets, 0.3, 0.05)
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(5))
    assert (soft[0, 1:] > 0).all()  # every other target gets some of the mass
    assert soft[0, 0] < 1.0 and soft[0, 0] > 0.7  # but the true target keeps most of it
    # A target close to row 0's gets more of row 0's soft mass than a far one.
    targets[2] = F.normalize(targets[0] + 0.1 * targets[2], dim=-1)
    soft = soft_similarity_labels(targets, 0.3, 0.05)
    assert soft[0, 2] > soft[0, 4]


def test_one_hot_labels_give_the_plain_contrastive_loss():
    queries, targets = unit(6, seed=1), unit(6, seed=2)
    labels = torch.eye(6)
    torch.testing.assert_close(
        soft_label_contrastive_loss(queries, targets, labels, 0.1),
        contrastive_loss(queries, targets, 0.1),
    )


def test_mutual_learning_teaches_the_student_only():
    student = torch.randn(4, 4, requires_grad=True)
    teacher = torch.randn(4, 4, requires_grad=True)
    loss = mutual_learning_loss(student, teacher)
    loss.backward()
    assert loss > 0 and student.grad is not None and teacher.grad is None
    assert mutual_learning_loss(teacher.detach(), teacher.detach()).abs() < 1e-6


@pytest.fixture
def dwc(tiny_backbone):
    torch.manual_seed(0)
    return create_method("dwc", tiny_backbone).eval()


def test_streams_and_combiner_weights(dwc, tiny_backbone):
    d = tiny_backbone.embed_dim
    v, t = torch.randn(4, d), torch.randn(4, d)
    queries = dwc.encode_queries_from_features(v, t)
    targets = dwc.encode_targets_from_features(torch.randn(6, d))
    assert queries.shape == (4, 2 * d) and targets.shape == (6, 2 * d)  # [q₁ ‖ q₂] / √2
    torch.testing.assert_close(queries.norm(dim=-1), torch.ones(4))
    # The score is the mean of the two streams' cosines.
    q1, q2 = dwc.emd_query(v, t), dwc.enhanced_query(v, t)
    g = torch.randn(1, d)
    g1, g2 = F.normalize(g, dim=-1), F.normalize(dwc.image_adapter(g), dim=-1)
    expected = ((q1 @ g1.T) + (q2 @ g2.T)) / 2
    torch.testing.assert_close(queries[:, :] @ dwc.encode_targets_from_features(g).T, expected)
    # At initialisation the enhancement stream is the zero-shot feature sum.
    torch.testing.assert_close(
        q2, F.normalize(F.normalize(v, dim=-1) + F.normalize(t, dim=-1), dim=-1)
    )
    # The adaptive combiner's two weights sum to one and change with the query.
    for module in dwc.weight_head:
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight)
    weights = dwc.modality_weights(*dwc.edited(F.normalize(v, dim=-1), F.normalize(t, dim=-1)))
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(4))
    assert weights[:, 0].std() > 1e-3
    equal = create_method("dwc-equal-weights", tiny_backbone)
    torch.testing.assert_close(equal.modality_weights(v, t), torch.full((4, 2), 0.5))


def test_explain_reports_the_weights_per_query(dwc, tiny_backbone):
    size = tiny_backbone.identity.image_size
    report = dwc.explain(torch.randn(2, 3, size, size), ["make it red", "remove the cube"])
    assert len(report["image_weight"]) == 2
    for w_v, w_t in zip(report["image_weight"], report["text_weight"], strict=True):
        assert 0 < w_v < 1 and abs(w_v + w_t - 1) < 1e-6


def test_steps_alternate_between_the_streams(tiny_backbone):
    """As the trainer steps: the resting stream keeps its weights exactly (no momentum or
    weight decay either), the learning one changes."""
    torch.manual_seed(0)
    method = create_method("dwc", tiny_backbone, finetune_text=False).train()
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad])
    d = tiny_backbone.embed_dim
    v, t, g = torch.randn(8, d), torch.randn(8, d), torch.randn(8, d)
    emd, enhancement = method.stream_parameters("emd"), method.stream_parameters("enhancement")
    for step in range(4):
        state = TrainingState(step, 10)
        learning, resting = (emd, enhancement) if step % 2 == 0 else (enhancement, emd)
        assert method.resting_parameters(state) == resting
        before = [p.detach().clone() for p in method.parameters()]
        queries = method.encode_queries_from_features(v, t)
        targets = method.encode_targets_from_features(g)
        method.embedding_loss(queries, targets, 0.1, state).backward()
        for parameter in method.resting_parameters(state):
            parameter.grad = None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        changed = {
            id(p)
            for p, old in zip(method.parameters(), before, strict=True)
            if not torch.equal(p, old)
        }
        assert not changed & {id(p) for p in resting}, step
        assert changed & {id(p) for p in learning}, step


def test_text_noise_swaps_a_fraction_of_the_texts(tmp_path):
    root = write_synthetic(tmp_path / "s", SynthConfig(train=60, val=6, test=6, test_unseen=3))
    pairs = Pairs.from_split(load_split("synthetic", root, "train"))
    noisy = pairs.with_text_noise(0.5, seed=3)
    changed = (noisy.text != pairs.text).float().mean().item()
    assert 0.35 <= changed <= 0.5  # half are swapped (a few draw an identical text)
    assert torch.equal(noisy.reference, pairs.reference)
    assert torch.equal(noisy.target, pairs.target)
    assert torch.equal(pairs.with_text_noise(0.5, seed=3).text, noisy.text)  # deterministic
    assert torch.equal(pairs.with_text_noise(0.0, seed=3).text, pairs.text)
    with pytest.raises(ValueError, match="fraction"):
        pairs.with_text_noise(1.5, seed=0)


@pytest.mark.parametrize("finetune_text", [False, True], ids=["frozen", "text-tower"])
def test_dwc_trains_and_its_loss_falls(tmp_path, finetune_text):
    torch.set_num_threads(1)
    root = write_synthetic(tmp_path / "s", SynthConfig(train=96, val=24, test=24, test_unseen=8))
    # The shipped backbone: on the random tiny one every frozen feature is nearly the same
    # vector, and the frozen variant sits at chance loss for many epochs whatever it does.
    config = TrainConfig(
        root=str(root),
        cache_dir=str(tmp_path / "cache"),
        method="dwc",
        method_config={"finetune_text": finetune_text},
        epochs=6,
        batch_size=16,
        warmup_steps=2,
        log_every=1,
        eval_every=0,
        text_noise=0.2,
        backbone_lr=1e-4,
    )
    result = train(config, tmp_path / "run", progress=False)
    epochs = [r for r in read_log(result.run_dir) if r["kind"] == "epoch"]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert set(result.results["test"]) == {"test", "test_free", "test_phrasing", "test_unseen"}
