"""``detr-viz evaluate``: scores equal to the library's, ground-truth matching in photo pixels,
bootstrap intervals that resample photos, and a rerun that reuses what is scored."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from detr_viz.cli import main
from detr_viz.eval_report import bootstrap_mean
from detr_viz.evaluation import iou, match_boxes
from detr_viz.explain import rollout
from detr_viz.faithfulness import pointing_energy, random_baseline, score_maps

from test_cli import SIZE, library_runner, photos, threshold_for


@pytest.fixture
def env(monkeypatch, weights_dir, tmp_path):
    monkeypatch.setenv("DETR_VIZ_WEIGHTS", str(weights_dir))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def test_evaluate_scores_as_the_library_and_matches_ground_truth(env, weights_dir, tmp_path,
                                                                 forwards):
    library = library_runner(weights_dir)
    paths = photos(tmp_path / "in", 2)
    threshold = threshold_for(library, paths, 2)
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "in"), "--methods", "raw,rollout", "--threshold",
                 str(threshold), "--out", str(out), *SIZE]) == 0
    first = library(paths[0])
    dets = first.detections(threshold)
    a, b = dets[0], dets[1]
    coco = {"images": [{"id": 7, "file_name": f"val/{paths[0].name}"}],
            "annotations": [  # a's own box and class; b's box under another class
                {"image_id": 7, "category_id": a.label, "iscrowd": 0,
                 "bbox": [a.box[0], a.box[1], a.box[2] - a.box[0], a.box[3] - a.box[1]]},
                {"image_id": 7, "category_id": (b.label % 90) + 1 if b.label != a.label else 0,
                 "iscrowd": 0,
                 "bbox": [b.box[0], b.box[1], b.box[2] - b.box[0], b.box[3] - b.box[1]]}]}
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    assert main(["evaluate", str(out), "--steps", "3", "--bootstrap", "200",
                 "--annotations", str(tmp_path / "instances.json")]) == 0
    with (out / "evaluation.csv").open() as f:
        rows = list(csv.DictReader(f))
    total = sum(len(library(p).detections(threshold)) for p in paths)
    assert len(rows) == 2 * total
    baseline = random_baseline(library.model, first, steps=3)
    queries = [d.query for d in dets]
    maps = {"raw attention": first.decoder_attentions(queries),
            "rollout": rollout(first).decoder_maps(queries)}
    mine = [r for r in rows if r["source"] == str(paths[0].resolve())]
    for det_index, det in enumerate(dets):
        scores = score_maps(library.model, first, det.query,
                            {m: maps[m][det_index] for m in maps}, steps=3, baseline=baseline)
        for method, score in scores.items():
            (row,) = [r for r in mine if int(r["query"]) == det.query and r["method"] == method]
            assert float(row["deletion_auc"]) == pytest.approx(score.deletion.auc, abs=1e-5)
            assert float(row["insertion_auc"]) == pytest.approx(score.insertion.auc, abs=1e-5)
            assert float(row["pointing"]) == pytest.approx(score.pointing, abs=1e-5)
            energy = float(row["gt_energy"])
            if det.query == a.query:  # ground truth = its own box: the pointing game again
                assert energy == pytest.approx(
                    pointing_energy(maps[method][det_index], first.grid, a.box), abs=1e-5)
            else:
                assert math.isnan(energy)
    table = (out / "evaluation.md").read_text()
    assert "| raw attention | " in table and "| rollout | " in table
    page = (out / "evaluation.html").read_text()
    assert page.count("plotly") > 3 and "Mean deletion curve" in page
    for report in (table, page):  # what was scored, and that these are not the released weights
        assert "Model: R50 (official COCO DETR R50); weights: detr-r50-e632da11.pth." in report
        assert "Photos: 2 scored." in report
        assert "so these scores describe what these weights do" in report
    before = len(forwards)
    assert main(["evaluate", str(out), "--steps", "3", "--bootstrap", "200"]) == 0
    assert len(forwards) == before  # every score was read back, nothing recomputed


def test_evaluate_needs_an_analyzed_folder(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path)]) == 125
    assert "detr-viz analyze" in capsys.readouterr().err


def test_matching_takes_the_same_class_best_overlap_once():
    truth = [(1, (0, 0, 10, 10)), (1, (20, 20, 30, 30)), (2, (0, 0, 10, 10))]
    dets = [{"query": 5, "label": 1, "score": 0.9, "box": (1, 1, 10, 10)},
            {"query": 6, "label": 1, "score": 0.8, "box": (0, 0, 10, 9)},  # same box, taken
            {"query": 7, "label": 2, "score": 0.7, "box": (40, 40, 50, 50)}]  # no overlap
    assert match_boxes(dets, truth) == {5: (0, 0, 10, 10)}
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)


def test_bootstrap_interval_width_and_photo_resampling():
    rng = np.random.default_rng(1)
    values = rng.normal(0.3, 1.0, 400)
    one = bootstrap_mean(values, np.arange(400), resamples=2000)
    assert one.low < values.mean() < one.high
    assert one.high - one.low == pytest.approx(2 * 1.96 / 20, rel=0.15)  # 2 x 1.96 sigma/sqrt(n)
    # ten identical detections per photo carry no more information than one: same interval
    tenfold = bootstrap_mean(np.repeat(values, 10), np.repeat(np.arange(400), 10),
                             resamples=2000)
    assert tenfold.high - tenfold.low == pytest.approx(one.high - one.low, rel=0.1)
    flat = bootstrap_mean([0.5] * 7 + [math.nan], list(range(8)))
    assert (flat.mean, flat.low, flat.high, flat.count) == (0.5, 0.5, 0.5, 7)


def test_a_deformable_checkpoint_is_scored_on_the_tokens_its_maps_are_drawn_from(tmp_path,
                                                                                  capsys):
    import torch
    from PIL import Image

    from detr_viz import analyze, load_model
    from detr_viz.explain import RAW, ROLLOUT
    from detr_viz.methods import Explainer, decoder_tokens

    from deformable_models import small_processor, tiny_model

    folder = tmp_path / "rt"
    tiny_model("rt_detr", dtype=torch.float32).save_pretrained(folder)
    small_processor("rt_detr").save_pretrained(folder)
    (tmp_path / "in").mkdir()
    photo = tmp_path / "in" / "p.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (90, 120, 3), np.uint8)).save(photo)
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "in"), "--checkpoint", str(folder), "--methods",
                 "raw,rollout", "--threshold", "0", "--out", str(out)]) == 0
    assert main(["evaluate", str(out), "--steps", "3", "--bootstrap", "50"]) == 0
    with (out / "evaluation.csv").open() as f:
        rows = list(csv.DictReader(f))
    model = load_model(checkpoint=folder)
    analysis = analyze(model, photo)
    queries = [d.query for d in analysis.detections(0.0)]
    assert len(rows) == 2 * len(queries) == 14
    baseline = random_baseline(model, analysis, steps=3)
    for method in (RAW, ROLLOUT):
        values = decoder_tokens(Explainer(model, analysis), method, queries)
        for query, v in zip(queries, values, strict=True):
            score = score_maps(model, analysis, query, {"m": v}, steps=3,
                               baseline=baseline)["m"]
            (row,) = [r for r in rows if int(r["query"]) == query and r["method"] == method]
            assert float(row["deletion_auc"]) == pytest.approx(score.deletion.auc, abs=1e-5)
            assert float(row["insertion_auc"]) == pytest.approx(score.insertion.auc, abs=1e-5)
            assert float(row["pointing"]) == pytest.approx(score.pointing, abs=1e-5)
    # stored maps that are not what the model draws now are refused, not scored
    from detr_viz.errors import DetrVizError
    from detr_viz.evaluation import _tokens_of, stored_maps
    from detr_viz.results import ResultStore

    stored = stored_maps(ResultStore(out), photo.resolve(), RAW)[1]
    assert _tokens_of(model, analysis, RAW, queries, stored, photo).shape == (7, 126)
    with pytest.raises(DetrVizError, match="not the model's now"):
        _tokens_of(model, analysis, RAW, queries, stored[:, ::-1], photo)
    # other weights under the same name: the photo is skipped and says why
    tiny_model("rt_detr", seed=1, dtype=torch.float32).save_pretrained(folder)
    for name in (out / "photos").glob("*/eval-*.json"):
        name.unlink()
    capsys.readouterr()
    assert main(["evaluate", str(out), "--steps", "3", "--bootstrap", "50"]) != 0
    assert "evaluate with the same model and checkpoint" in capsys.readouterr().err
