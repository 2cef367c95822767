"""The real-benchmark loaders on tiny fixtures written in each data set's published layout."""

import json

import pytest
import torch
from benchmark_fixtures import (
    F200K_TEST,
    FIQ_CATEGORIES,
    write_circo,
    write_cirr,
    write_fashion200k,
    write_fashioniq,
    write_folder,
    write_json,
    write_shoes,
)

from circe.data.cirr import load_cirr
from circe.data.errors import DatasetWarning
from circe.data.fashion200k import different_words
from circe.data.fashioniq import join_captions, load_fashioniq
from circe.data.registry import check_dataset, load_benchmark, load_split
from circe.data.types import DatasetFormatError
from circe.eval.benchmark import score_benchmark

WRITERS = {
    "fashioniq": write_fashioniq,
    "cirr": write_cirr,
    "circo": write_circo,
    "shoes": write_shoes,
    "fashion200k": write_fashion200k,
    "folder": write_folder,
}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """One pristine copy of every fixture (tests that break files write their own)."""
    return {name: write(tmp_path_factory.mktemp(name)) for name, write in WRITERS.items()}


# ----------------------------------------------------------------------------- FashionIQ


def test_fashioniq_default_protocol_is_clip4cirs(roots):
    split = load_split("fashioniq", roots["fashioniq"], "dress.val")
    assert split.gallery.ids == ["D1", "D2", "D3", "D4", "D5"]  # the image split file
    assert split.gallery.paths["D2"].name == "D2.jpg"  # the extension is resolved
    assert split.gallery.paths["D1"].name == "D1.png"
    first = split.queries[0]
    assert (first.reference_id, first.target_ids, first.tags) == ("D1", ("D2",), ("dress",))
    # strip ".?, " and capitalise, which also lower-cases the rest of the first caption
    assert first.text == "Is red and longer"
    assert not split.exclude_reference
    assert split.protocol == {
        "dataset": "fashioniq",
        "split": "dress.val",
        "categories": "dress",
        "gallery": "original-split",
        "mask_reference": "no",
        "caption_join": "clip4cir",
        "text_cleanup": "none",
        "metrics": "R@10, R@50 per category; their means over categories; Avg = mean",
        "reference_excluded": "no",
        "queries": "2",
        "gallery_images": "5",
        "preset": "clip4cir",
    }


def test_fashioniq_presets_change_gallery_masking_and_text(roots):
    dqu = load_split("fashioniq", roots["fashioniq"], "shirt.val", protocol="dqu-cir")
    assert dqu.gallery.ids == ["S1", "S2", "S3", "S4"]  # VAL-split: query images only
    assert dqu.exclude_reference
    assert dqu.queries[1].text == "yellow shiny and short"  # spelling dictionary applied
    assert dqu.protocol["gallery"] == "val-split" and dqu.protocol["preset"] == "dqu-cir"
    dwc = load_split("fashioniq", roots["fashioniq"], "toptee.val", protocol="dwc")
    assert dwc.queries[0].text == "<BOS>  is Red. <AND> longer, <EOS>"
    assert join_captions(" a.", "b?", "and") == " a. and b?"


def test_fashioniq_val_is_three_parts_and_pools_for_training(roots):
    benchmark = load_benchmark("fashioniq", roots["fashioniq"])
    assert [p.name for p in benchmark.parts] == ["dress.val", "shirt.val", "toptee.val"]
    assert benchmark.protocol["gallery_images"] == "5"
    assert benchmark.protocol["split"] == "val"
    pooled = load_split("fashioniq", roots["fashioniq"], "train")
    assert len(pooled.queries) == 3 and len(pooled.gallery) == 6
    test = load_split("fashioniq", roots["fashioniq"], "dress.test")
    assert test.queries[0].target_ids == () and test.gallery.ids == ["D9"]
    assert not load_benchmark("fashioniq", roots["fashioniq"], "test").labelled


# ----------------------------------------------------------------------------- CIRR


def test_cirr_reads_split_files_and_img_sets(roots):
    split = load_cirr(roots["cirr"], "val")
    assert len(split.gallery) == 8  # dev-7 is in no query and still in the gallery
    query = split.queries[0]
    assert (query.query_id, query.reference_id, query.target_ids) == ("10", "dev-0", ("dev-1",))
    assert query.subset_ids == ("dev-0", "dev-1", "dev-2", "dev-3", "dev-4", "dev-5")
    assert query.text == "caption 10"
    assert split.exclude_reference and split.protocol["version"] == "rc2"
    train = load_cirr(roots["cirr"], "train")  # paths in numbered sub-folders
    assert train.gallery.paths["train-1"] == roots["cirr"] / "train/1/train-1.png"
    test = load_cirr(roots["cirr"], "test1")
    assert all(q.target_ids == () for q in test.queries) and len(test.gallery) == 56


def test_cirr_plain_clone_layout_with_img_raw(tmp_path):
    """Annotations at the root (a clone of the cirr_dataset branch), images under img_raw/."""
    write_cirr(tmp_path / "staging")
    (tmp_path / "staging" / "cirr").rename(tmp_path / "cirr")
    (tmp_path / "staging").rename(tmp_path / "cirr" / "img_raw")
    split = load_cirr(tmp_path / "cirr", "val")
    assert split.gallery.paths["dev-0"] == tmp_path / "cirr/img_raw/dev/dev-0.png"


# ----------------------------------------------------------------------------- CIRCO


def test_circo_gallery_templates_and_tags(roots):
    split = load_split("circo", roots["circo"], "val")
    assert len(split.gallery) == 55 and split.gallery.ids[0] == "1"
    query = split.queries[0]
    assert query.target_ids == ("2", "3", "4") and query.reference_id == "1"
    assert query.text == "has two dogs" and query.tags == ("cardinality", "addition")
    assert not split.exclude_reference
    assert split.protocol["query_template"] == "{relative_caption}"
    magic = load_split("circo", roots["circo"], "val", protocol="magiclens")
    assert magic.queries[0].text == "find a dog but has two dogs"
    assert magic.protocol["query_template"] == "find {shared_concept} but {relative_caption}"
    test = load_split("circo", roots["circo"], "test")
    assert [q.query_id for q in test.queries] == ["0", "1", "2"]
    assert all(not q.target_ids for q in test.queries)


def test_bad_protocol_values_are_refused(roots):
    from circe.data.circo import load_circo

    with pytest.raises(ValueError, match="unknown field.*concept"):
        load_circo(roots["circo"], "val", query_template="{concept} {relative_caption}")
    with pytest.raises(ValueError, match="no protocol preset 'nope'.*clip4cir, dqu-cir, dwc"):
        load_split("fashioniq", roots["fashioniq"], "val", protocol="nope")
    with pytest.raises(ValueError, match="gallery must be one of"):
        load_fashioniq(roots["fashioniq"], "dress.val", gallery="all")
    with pytest.raises(ValueError, match="cirr has no split 'test'.*test1"):
        load_split("cirr", roots["cirr"], "test")


# ----------------------------------------------------------------------------- Shoes


def test_shoes_pairs_follow_the_reference_and_the_eval_list(roots):
    split = load_split("shoes", roots["shoes"], "test")
    assert split.gallery.ids == [f"img_womens_boots_{i}.jpg" for i in (1, 2, 3)]
    assert [q.reference_id for q in split.queries] == [
        "img_womens_boots_1.jpg",
        "img_womens_boots_3.jpg",
    ]
    assert split.queries[0].text == "is Blak" and split.exclude_reference
    train = load_split("shoes", roots["shoes"], "train")
    assert len(train.queries) == 1 and train.queries[0].target_ids == ("img_womens_clogs_5.jpg",)
    cleaned = load_split("shoes", roots["shoes"], "test", protocol="dqu-cir")
    assert cleaned.queries[0].text == "is black"


# ----------------------------------------------------------------------------- Fashion200K


def test_fashion200k_queries_and_caption_matched_targets(roots):
    split = load_split("fashion200k", roots["fashion200k"], "test")
    assert split.gallery.ids == [path for path, _ in F200K_TEST]
    assert split.gallery.captions[F200K_TEST[1][0]] == "blue sleeveless dress"
    first, second = split.queries
    assert first.text == "replace black with blue"
    # the target, then every other test image with the target's caption
    assert first.target_ids == (F200K_TEST[1][0], F200K_TEST[2][0])
    assert second.text == "replace midi with sleeveless"
    assert split.exclude_reference
    dwc = load_split("fashion200k", roots["fashion200k"], "test", protocol="dwc")
    assert dwc.queries[0].text == "replace black with blue and get blue sleeveless dress"
    assert different_words("a b c", "a b c") == ("c", "c")  # TIRG's loop falls through


def test_fashion200k_training_queries_link_one_word_siblings(roots):
    split = load_split("fashion200k", roots["fashion200k"], "train")
    pairs = {(q.reference_id[-10:], q.target_ids[0][-10:]) for q in split.queries}
    # red/blue lace dress are siblings; the green maxi gown has none
    assert pairs == {("6/6_0.jpeg", "7/7_0.jpeg"), ("7/7_0.jpeg", "6/6_0.jpeg")}
    assert split.protocol["seed"] == "0"


# ----------------------------------------------------------------------------- own images


def test_folder_gallery_is_recursive_and_queries_come_from_csv_or_jsonl(roots):
    split = load_split("folder", roots["folder"], "queries")
    assert split.gallery.ids == ["a/b/y.jpg", "a/x.png", "z.webp"]
    assert [(q.reference_id, q.text, q.target_ids) for q in split.queries] == [
        ("a/x.png", "make it blue", ("a/b/y.jpg",)),
        ("z.webp", "make it red", ("a/x.png",)),
    ]
    other = load_split("folder", roots["folder"], "other")
    assert other.queries[0].target_ids == ("z.webp", "a/b/y.jpg")
    assert other.queries[1].query_id == "q7"


def test_folder_kinds_become_tags_scored_per_kind(tmp_path):
    """A `kind` column tags its queries (a blank cell: no tag) and the scores come per kind,
    which is what `circe eval --by-kind` prints."""
    root = write_folder(tmp_path)
    (root / "queries.csv").write_text(
        "reference,text,target,kind\n"
        "a/x.png,make it blue,a/b/y.jpg,colour\n"
        "z.webp,make it red,a/x.png,colour\n"
        "a/b/y.jpg,make it a star,z.webp,\n"
        "a/x.png,make it round,z.webp, shape\n"
    )
    benchmark = load_benchmark("folder", root, "queries")
    assert [q.tags for q in benchmark.parts[0].queries] == [
        ("colour",),
        ("colour",),
        (),
        ("shape",),
    ]
    # Gallery columns a/b/y.jpg, a/x.png, z.webp (each query's reference masked).
    scores = torch.tensor(
        [
            [3.0, 9.0, 1.0],  # target a/b/y.jpg first once the reference is masked: hit
            [3.0, 2.0, 9.0],  # target a/x.png behind a/b/y.jpg: miss at 1
            [9.0, 1.0, 0.0],  # untagged, target z.webp behind a/x.png: miss at 1
            [1.0, 9.0, 2.0],  # target z.webp first once the reference is masked: hit
        ]
    )
    result = score_benchmark(benchmark, [scores])
    assert result.metrics["R@1"] == 50.0
    assert set(result.per_tag) == {"colour", "shape"}
    assert result.per_tag["colour"]["R@1"] == 50.0 and result.per_tag["colour"]["R@10"] == 100.0
    assert result.per_tag["shape"]["R@1"] == 100.0
    # JSONL too, and a file without kinds stays valid: no tags.
    (root / "tagged.jsonl").write_text(
        json.dumps({"reference": "a/x.png", "text": "t", "target": "z.webp", "kind": "move"})
    )
    assert load_split("folder", root, "tagged").queries[0].tags == ("move",)
    assert all(not q.tags for q in load_split("folder", root, "other").queries)


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (
            'reference,text,kind\na/x.png,make it blue,colour\nz.webp,make it red," "\n',
            "queries.csv: line 3 has an empty 'kind'",
        ),
        (
            '{"reference": "a/x.png", "text": "t", "kind": ""}\n',
            "queries.jsonl: line 1 has an empty 'kind'",
        ),
        (
            '{"reference": "a/x.png", "text": "t"}\n'
            + json.dumps({"reference": "z.webp", "text": "u", "kind": ["colour"]}),
            "queries.jsonl: line 2 has 'kind' = ['colour'], expected a string",
        ),
    ],
    ids=["csv-blank", "jsonl-empty", "jsonl-list"],
)
def test_a_malformed_folder_kind_names_file_and_record(tmp_path, lines, expected):
    root = write_folder(tmp_path)
    (root / "queries.csv").unlink()
    suffix = ".csv" if lines.startswith("reference,") else ".jsonl"
    (root / f"queries{suffix}").write_text(lines)
    with pytest.raises(DatasetFormatError) as error:
        load_split("folder", root, "queries")
    assert expected in str(error.value)


# ----------------------------------------------------------------------------- malformed input


def _break_fashioniq(root):
    records = json.loads((root / "captions/cap.dress.val.json").read_text())
    del records[1]["target"]
    write_json(root / "captions/cap.dress.val.json", records)
    return "cap.dress.val.json: record #1 lacks key 'target'"


def _break_cirr(root):
    records = json.loads((root / "cirr/captions/cap.rc2.val.json").read_text())
    records[2]["img_set"]["members"] = "dev-4"
    write_json(root / "cirr/captions/cap.rc2.val.json", records)
    return "cap.rc2.val.json: record #2 img_set has 'members' = 'dev-4', expected a list"


def _break_circo(root):
    records = json.loads((root / "annotations/val.json").read_text())
    records[0]["gt_img_ids"] = [2, "3"]
    write_json(root / "annotations/val.json", records)
    return "val.json: record #0 has 'gt_img_ids'"


def _break_shoes(root):
    (root / "relative_captions_shoes.json").write_text("[{]")
    return "relative_captions_shoes.json: not valid JSON"


def _break_fashion200k(root):
    with (root / "labels/dress_test_detect_all.txt").open("a") as f:
        f.write("women/x.jpeg 0.5 no tabs here\n")
    return "dress_test_detect_all.txt: line 3 is not"


def _break_folder(root):
    (root / "queries.csv").write_text("reference,text\na/x.png,\n")
    return "queries.csv: line 2 lacks key 'text'"


@pytest.mark.parametrize(
    ("dataset", "split", "breaks"),
    [
        ("fashioniq", "dress.val", _break_fashioniq),
        ("cirr", "val", _break_cirr),
        ("circo", "val", _break_circo),
        ("shoes", "test", _break_shoes),
        ("fashion200k", "test", _break_fashion200k),
        ("folder", "queries", _break_folder),
    ],
)
def test_a_malformed_record_names_file_and_record(tmp_path, dataset, split, breaks):
    root = WRITERS[dataset](tmp_path)
    expected = breaks(root)
    with pytest.raises(DatasetFormatError) as error:
        load_split(dataset, root, split)
    assert expected in str(error.value)


MISSING_IMAGES = {
    "fashioniq": ("dress.val", "images/D5.png", "split.dress.val.json: image 'D5' has no file"),
    "cirr": ("val", "dev/dev-7.png", "split.rc2.val.json: image 'dev-7' has no file"),
    "circo": (
        "val",
        "COCO2017_unlabeled/unlabeled2017/000000000055.jpg",
        "image_info_unlabeled2017.json: image '55' has no file",
    ),
    "shoes": ("test", "womens_boots/0/img_womens_boots_3.jpg", "eval_im_names.txt: image"),
    "fashion200k": ("test", F200K_TEST[4][0], "names image 'women/skirts/mini/5/5_0.jpeg'"),
    "folder": ("queries", "a/b/y.jpg", "queries.csv: query '0' names image 'a/b/y.jpg'"),
}


@pytest.mark.parametrize("dataset", sorted(MISSING_IMAGES))
def test_a_missing_image_is_an_error_not_a_smaller_gallery(tmp_path, dataset):
    """An image nobody queries (FashionIQ D5, CIRR dev-7, ...) must still be there."""
    split, relative, expected = MISSING_IMAGES[dataset]
    root = WRITERS[dataset](tmp_path)
    (root / relative).unlink()
    with pytest.raises(DatasetFormatError) as error:
        load_split(dataset, root, split)
    assert expected in str(error.value)


def test_a_missing_annotation_file_is_named(tmp_path):
    root = write_cirr(tmp_path)
    (root / "cirr/captions/cap.rc2.val.json").unlink()
    with pytest.raises(DatasetFormatError, match=r"missing file .*cap\.rc2\.val\.json"):
        load_split("cirr", root, "val")


def test_check_dataset_reports_every_problem(tmp_path):
    root = write_fashioniq(tmp_path)
    _break_fashioniq(root)
    (root / "images/S5.png").unlink()
    (root / "captions/cap.toptee.val.json").unlink()
    report = check_dataset("fashioniq", root, "val")
    assert len(report.problems) == 3
    assert "record #1 lacks key 'target'" in report.problems[0]
    assert "image 'S5' has no file" in report.problems[1]
    assert "missing file" in report.problems[2] and "cap.toptee.val.json" in report.problems[2]
    # what could be read is counted: dress lost a query, shirt an image, toptee its queries
    assert report.counts == {"dress.val": (1, 5), "shirt.val": (2, 4), "toptee.val": (0, 5)}
    clean = check_dataset("cirr", write_cirr(tmp_path / "clean"), "val")
    assert clean.problems == [] and clean.counts == {"val": (3, 8)}


def test_check_dataset_without_a_split_checks_every_split(tmp_path):
    """A broken training record is found too, not only the evaluated split's problems; each
    split is checked once (FashionIQ's per-category splits with their whole split)."""
    root = write_fashioniq(tmp_path)
    path = root / "captions" / "cap.shirt.train.json"
    path.write_text(json.dumps([{"candidate": "S7", "captions": ["a", "b"]}]))  # no target
    report = check_dataset("fashioniq", root)
    assert set(report.counts) == {
        f"{c}.{p}" for c in FIQ_CATEGORIES for p in ("train", "val", "test")
    }
    assert (
        len(report.problems) == 1
        and "cap.shirt.train.json: record #0 lacks key 'target'" in report.problems[0]
    )
    assert report.counts["dress.train"] == (1, 2) and report.counts["shirt.train"] == (0, 2)


def test_fashioniq_records_with_an_empty_caption_are_kept_with_a_warning(tmp_path):
    """The published files hold 16 such records; every paper's loader keeps them."""
    root = write_fashioniq(tmp_path / "fiq")
    path = root / "captions" / "cap.dress.val.json"
    records = json.loads(path.read_text())
    records[1]["captions"][0] = ""
    path.write_text(json.dumps(records))
    with pytest.warns(
        DatasetWarning, match=r"cap.dress.val.json: 1 record\(s\) with an empty caption \(#1\)"
    ):
        split = load_split("fashioniq", root, "dress.val")
    assert len(split.queries) == 2
