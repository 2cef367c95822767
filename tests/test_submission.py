"""Test-server files (CIRR, CIRCO) and `circe eval` / `circe check-dataset` on real layouts."""

import json
from pathlib import Path

import pytest
import torch
from benchmark_fixtures import write_circo, write_cirr, write_fashioniq
from typer.testing import CliRunner

from circe.cli import app
from circe.data.registry import load_benchmark
from circe.eval.submission import write_submission

runner = CliRunner()


@pytest.fixture
def model_args(tiny_weights):
    config, weights = tiny_weights
    return ["--method", "image-only", "--backbone", f"open_clip:{config}", "--weights", weights]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_cirr_test1_submission_from_the_command_line(tmp_path, model_args):
    root = write_cirr(tmp_path / "cirr")
    out = tmp_path / "submission"
    result = run("eval", "--dataset", "cirr", "--root", root, "--split", "test1", *model_args,
                 "--submission", out, "--json", tmp_path / "record.json")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "upload them to https://cirr.zheyuanliu.me/evaluate.html" in result.output
    record = json.loads((tmp_path / "record.json").read_text())
    assert sorted(Path(p).name for p in record["submission_files"]["image-only"]) == [
        "cirr_test1_recall.json",
        "cirr_test1_recall_subset.json",
    ]
    recall = json.loads((out / "cirr_test1_recall.json").read_text())
    subset = json.loads((out / "cirr_test1_recall_subset.json").read_text())
    pairs = json.loads((root / "cirr/captions/cap.rc2.test1.json").read_text())
    gallery = set(json.loads((root / "cirr/image_splits/split.rc2.test1.json").read_text()))
    keys = {"version", "metric"} | {str(p["pairid"]) for p in pairs}
    assert set(recall) == keys and set(subset) == keys
    assert (recall["version"], recall["metric"]) == ("rc2", "recall")
    assert (subset["version"], subset["metric"]) == ("rc2", "recall_subset")
    for pair in pairs:
        top50, top3 = recall[str(pair["pairid"])], subset[str(pair["pairid"])]
        assert len(top50) == 50 == len(set(top50)) and set(top50) <= gallery
        assert len(top3) == 3 == len(set(top3))
        assert pair["reference"] not in top50 and pair["reference"] not in top3
        assert set(top3) <= set(pair["img_set"]["members"])
        # the subset ranking is the global ranking restricted to the members
        assert top3 == [i for i in top50 if i in pair["img_set"]["members"]][:3]


def test_hidden_labels_need_a_submission_directory(tmp_path, model_args):
    root = write_cirr(tmp_path)
    result = run("eval", "--dataset", "cirr", "--root", root, "--split", "test1", *model_args)
    assert result.exit_code == 2
    assert "hidden test labels" in result.output and "--submission" in result.output


def test_cirr_submission_needs_50_candidates(tmp_path):
    benchmark = load_benchmark("cirr", write_cirr(tmp_path, test_images=20), "test1")
    with pytest.raises(ValueError, match="lists 50 images per query.*has only 19"):
        write_submission(benchmark, [torch.zeros(3, 20)], tmp_path / "out")


def circo_ap(predictions: list[int], ground_truths: list[int], k: int) -> float:
    """AP@k as CIRCO's evaluation server computes it from a submitted list."""
    hits = [p in ground_truths for p in predictions[:k]]
    precisions = [sum(hits[: i + 1]) / (i + 1) for i, hit in enumerate(hits) if hit]
    return sum(precisions) / min(len(ground_truths), k)


def test_circo_submissions_have_every_query_and_50_distinct_ids(tmp_path):
    root = write_circo(tmp_path / "circo")
    test = load_benchmark("circo", root, "test")
    scores = torch.randint(0, 3, (3, 55), generator=torch.Generator().manual_seed(0)).float()
    (path,) = write_submission(test, [scores], tmp_path / "out")
    content = json.loads(path.read_text())
    assert path.name == "circo_test.json" and set(content) == {"0", "1", "2"}
    for ids in content.values():
        assert len(ids) == 50 == len(set(ids)) and all(type(i) is int for i in ids)
        assert set(ids) <= set(range(1, 56))
    # on val, the server's mAP of the file equals circe's mAP
    from circe.eval.benchmark import score_benchmark

    val = load_benchmark("circo", root, "val")
    val_scores = torch.randn(2, 55, generator=torch.Generator().manual_seed(1))
    (path,) = write_submission(val, [val_scores], tmp_path / "val")
    served = json.loads(path.read_text())
    records = json.loads((root / "annotations/val.json").read_text())
    ours = score_benchmark(val, [val_scores]).metrics
    for k in (5, 10, 25, 50):
        aps = [circo_ap(served[str(r["id"])], r["gt_img_ids"], k) for r in records]
        assert ours[f"mAP@{k}"] == pytest.approx(100 * sum(aps) / len(aps))


def test_fashioniq_eval_reports_categories_and_records_the_protocol(tmp_path, model_args):
    root = write_fashioniq(tmp_path / "fiq")
    out = tmp_path / "results.json"
    result = run("eval", "--dataset", "fashioniq", "--root", root, "--protocol", "dqu-cir",
                 *model_args, "--json", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "image-only per part" in result.output
    record = json.loads(out.read_text())
    assert record["split"] == "val"
    assert set(record["results"]["image-only"]) == {"R@10", "R@50", "Avg"}
    assert set(record["per_part"]["image-only"]) == {"dress.val", "shirt.val", "toptee.val"}
    protocol = record["protocol"]
    assert protocol["preset"] == "dqu-cir" and protocol["gallery"] == "val-split"
    assert protocol["text_cleanup"] == "dqu-cir" and protocol["reference_excluded"] == "yes"


def test_check_dataset_command(tmp_path):
    root = write_cirr(tmp_path)
    result = run("check-dataset", "--dataset", "cirr", "--root", root)
    assert result.exit_code == 0 and "val: 3 queries, 8 gallery images" in result.output
    (root / "dev/dev-7.png").unlink()
    (root / "dev/dev-6.png").unlink()
    result = run("check-dataset", "--dataset", "cirr", "--root", root)
    assert result.exit_code == 1
    assert "image 'dev-6' has no file" in result.output
    assert "image 'dev-7' has no file" in result.output
    # pair 11 has dev-6 among its img_set members, pair 12 as its target
    assert "query '11' names image 'dev-6'" in result.output
    assert "query '12' names image 'dev-6'" in result.output
    assert "4 problem(s)" in result.output and "val: 1 queries, 6 gallery images" in result.output


def test_a_submission_for_a_data_set_without_a_test_server_is_refused_first(
    tmp_path, model_args, monkeypatch, bench
):
    """Said before any image is encoded (minutes on a real data set)."""
    import circe.eval.compare

    def no_encoding(*args, **kwargs):
        raise AssertionError("nothing may be encoded for a submission that cannot exist")

    monkeypatch.setattr(circe.eval.compare, "score_matrix", no_encoding)
    result = run("eval", "--dataset", "synthetic", "--root", bench, *model_args,
                 "--submission", tmp_path / "out")  # fmt: skip
    assert result.exit_code == 2 and "score it without --submission" in result.output
