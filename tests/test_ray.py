"""``detr-viz analyze --ray`` on a local Ray instance (loopback, 2 CPUs): the same files as the
local run, and a worker killed mid-batch loses nothing once the command is run again."""

from __future__ import annotations

import threading
import time

import pytest

from detr_viz.cli import main
from detr_viz.ray_batch import ACTOR_NAME, NAMESPACE

from test_cli import _same_results, library_runner, photos, threshold_for

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install -r "
                                        "requirements-ray.txt to test detr-viz analyze --ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             namespace=NAMESPACE, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def library(weights_dir):
    return library_runner(weights_dir)


def _args(weights_dir, library, paths, size=("96", "128")):
    return ["--methods", "raw,rollout", "--threshold", str(threshold_for(library, paths, 1)),
            "--short-side", size[0], "--max-size", size[1],
            "--checkpoint", str(weights_dir / "detr-r50-e632da11.pth")]


def test_ray_run_equals_the_local_run(local_ray, weights_dir, library, tmp_path, capsys):
    paths = photos(tmp_path / "in", 3)
    args = _args(weights_dir, library, paths)
    assert main(["analyze", str(tmp_path / "in"), "--out", str(tmp_path / "local"), *args]) == 0
    capsys.readouterr()
    assert main(["analyze", str(tmp_path / "in"), "--out", str(tmp_path / "ray"), "--ray",
                 "--workers", "2", *args]) == 0
    err = capsys.readouterr().err  # what the workers loaded, said as the local run says it
    assert "detr-viz: R50 (official COCO DETR R50) on CPU, 2 Ray workers" in err
    assert "are not the official detr_resnet50 release" in err
    _same_results(tmp_path / "local", tmp_path / "ray", rtol=1e-4)


def test_a_killed_worker_loses_nothing_after_a_rerun(local_ray, weights_dir, library, tmp_path):
    paths = photos(tmp_path / "in", 8)
    args = _args(weights_dir, library, paths)
    out = tmp_path / "ray"
    command = ["analyze", str(tmp_path / "in"), "--out", str(out), "--ray", "--workers", "2",
               *args]
    status = []
    run = threading.Thread(target=lambda: status.append(main(command)))
    run.start()
    deadline = time.monotonic() + 300
    while not list(out.glob("photos/*/done.json")) and time.monotonic() < deadline:
        time.sleep(0.02)
    ray.kill(ray.get_actor(ACTOR_NAME.format(0), namespace=NAMESPACE))
    run.join(300)
    done = len(list(out.glob("photos/*/done.json")))
    assert status and status[0] == 8 - done  # each photo is done or reported failed
    assert main(command) == 0
    assert main(["analyze", str(tmp_path / "in"), "--out", str(tmp_path / "local"), *args]) == 0
    _same_results(tmp_path / "local", out, rtol=1e-4)
