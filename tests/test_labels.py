"""Class names from the files users have: text, JSON list, id map, COCO annotations."""

from __future__ import annotations

import pytest

from detr_viz.coco import COCO_CLASSES
from detr_viz.errors import ArgumentError
from detr_viz.labels import default_labels, parse_labels, read_labels
from detr_viz.spec import class_name


@pytest.mark.parametrize(("name", "text", "want"), [
    ("classes.txt", "cat\ndog\n\nfox\n", None),  # a blank line inside is an unnamed class
    ("classes.txt", "\ufeffcat\r\ndog\r\nfox\r\nbird\r\n", ("cat", "dog", "fox", "bird")),
    ("classes.json", '["cat", "dog", "fox", "bird"]', ("cat", "dog", "fox", "bird")),
    ("map.json", '{"0": "cat", "3": "bird", "1": "dog"}', ("cat", "dog", "N/A", "bird")),
    ("instances_train.json", '{"images": [], "annotations": [], "categories": ['
     '{"id": 1, "name": "cat", "supercategory": "animal"}, {"id": 3, "name": "bird"}]}',
     ("N/A", "cat", "N/A", "bird")),
    ("config.json", '{"model_type": "detr", "id2label": {"0": "a", "1": "b", "2": "c", '
     '"3": "d"}}', ("a", "b", "c", "d")),
])
def test_formats(tmp_path, name, text, want):
    if want is None:
        assert parse_labels(text, name, 4) == ("cat", "dog", "N/A", "fox")
        return
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    assert read_labels(path, 4) == want
    assert read_labels(str(path), 4) == want


def test_names_given_in_the_api():
    assert read_labels(["a", "b"], 2) == ("a", "b")
    assert read_labels({1: "b"}, 2) == ("N/A", "b")
    assert default_labels(3) == ("class 0", "class 1", "class 2")
    assert class_name(("a", ""), 1) == "class 1" and class_name(COCO_CLASSES, 18) == "dog"


@pytest.mark.parametrize(("labels", "n", "message"), [
    (["cat", "dog"], 4, "lists 2 names, but the checkpoint has 4 classes. Is it the labels file"),
    (["cat", "dog", "fox"], 4, "ids start at 1"),  # the DETR convention for custom datasets
    ({7: "cat"}, 4, "names class id 7, but the checkpoint has 4 classes"),
    ([1, 2], 2, "labels must be names"),
])
def test_labels_that_do_not_fit(labels, n, message):
    with pytest.raises(ArgumentError, match=message):
        read_labels(labels, n)


@pytest.mark.parametrize(("text", "message"), [
    ("[1, 2", "looks like JSON but does not parse"),
    ('{"categories": [{"name": "cat"}]}', "integer 'id' and a 'name'"),
    ('{"cat": 0}', "map integer ids to names"),
])
def test_broken_files(text, message):
    with pytest.raises(ArgumentError, match=message):
        parse_labels(text, "labels.json", 2)


def test_unreadable_file(tmp_path):
    with pytest.raises(ArgumentError, match="Cannot read the labels file"):
        read_labels(tmp_path / "missing.txt", 2)
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ArgumentError, match="Cannot read the labels file"):
        read_labels(tmp_path / "binary.txt", 2)
