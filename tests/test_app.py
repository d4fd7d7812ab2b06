"""The Gradio app on the embedded tiny pipeline: its checks, its API through gradio_client, and the
page itself in headless Chromium (Debian's chromium, driven by Python playwright)."""

from __future__ import annotations

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import copy
import shutil
import socket

import httpx
import numpy as np
import pytest
from concept_helpers import QUICK_YAML, photos, train_tiny_concept
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from apps.gradio_app import AppConfig, AppInputError, Studio, launch

CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_pipe, tmp_path_factory):
    """The app on a free port over an outputs folder holding alpha (slot 0) and beta (slot 1); uploads limited to 50 kB."""
    root = tmp_path_factory.mktemp("app")
    outputs = root / "outputs"
    for name, slot in (("alpha", 0), ("beta", 1)):
        train_tiny_concept(tiny_pipe, outputs, name, slot)
    (root / "quick.yaml").write_text(QUICK_YAML)
    config = AppConfig(outputs=str(outputs), model="tiny", port=free_port(), max_upload_mb=0.05, train_config=str(root / "quick.yaml"))
    studio = Studio(config, pipe=copy.deepcopy(tiny_pipe))
    demo = launch(studio, block=False)
    yield studio, f"http://127.0.0.1:{config.port}/", root
    demo.close()
    studio.close()


@pytest.fixture(scope="module")
def client(served):
    return Client(served[1], verbose=False)


def generate(client, **kw):
    args = dict(prompt="a photo of <alpha1> toy and <beta1> toy", concepts={"alpha/sbora-fa": 1.0, "beta/sbora-fa": 0.8}, steps=2)
    return client.predict(**{**args, **kw}, api_name="/generate")


def test_generate_with_two_concepts_through_gradio_client(client):
    assert sorted(client.view_api(return_format="dict", print_info=False)["named_endpoints"]) == ["/generate", "/train"]
    files, info = generate(client, regions={"alpha/sbora-fa": [0, 0, 0.5, 1]}, region_prompts={"alpha/sbora-fa": "a photo of <alpha1> toy"},
                           seed=5, num_images=2)
    assert len(files) == 2
    images = [np.asarray(Image.open(f)) for f in files]
    assert all(im.shape == (64, 64, 3) for im in images) and not np.array_equal(images[0], images[1])
    assert info["seeds"] == [5, 6] and info["concepts"] == {"alpha/sbora-fa": 1.0, "beta/sbora-fa": 0.8}
    assert info["regions"] == {"alpha/sbora-fa": [0, 0, 0.5, 1]} and info["seconds"] > 0
    (pair,) = info["overlap"]
    assert pair["pair"] == "alpha/sbora-fa+beta/sbora-fa" and pair["max_interference"] == 0 and info["warnings"] == []
    again, _ = generate(client, regions={"alpha/sbora-fa": [0, 0, 0.5, 1]}, region_prompts={"alpha/sbora-fa": "a photo of <alpha1> toy"},
                        seed=6)
    # Image k is seed k, whatever the batch (up to one level: a batch of 4 rows rounds a few sums differently).
    assert np.abs(np.asarray(Image.open(again[0])).astype(int) - images[1]).max() <= 1


def answers(client) -> None:
    files, _ = generate(client, steps=1)
    assert len(files) == 1 and Image.open(files[0]).size == (64, 64)


def test_bad_requests_get_errors_and_the_app_keeps_answering(served, client, tmp_path):
    _, url, _ = served
    for bad, message in (("../x", "is not a concept name"), ("a/b", "no concept 'a/b'"), ("alpha/../../etc", "is not a concept name")):
        with pytest.raises(AppError, match=message):
            generate(client, concepts={bad: 1.0})
        answers(client)
    with pytest.raises(AppError, match="steps must be a whole number from 1 to 100"):
        generate(client, steps=100_000)
    with pytest.raises(AppError, match="four numbers"):
        generate(client, regions={"alpha/sbora-fa": [0, 0, 2, 1]})
    answers(client)
    good = photos(tmp_path / "photos", "gamma", 3)
    # An oversized upload: refused (by the client before sending, and by the server for anyone else).
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (160, 160, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > 0.05 * 1024 * 1024
    with pytest.raises((AppError, ValueError), match="(?i)size|larger"):
        client.predict(name="gamma", class_word="toy", photos=[handle_file(str(p)) for p in [big, *sorted(good.iterdir())[:2]]],
                       api_name="/train")
    response = httpx.post(url + "gradio_api/upload", files={"files": ("big.png", big.read_bytes(), "image/png")})
    assert response.status_code == 413
    adapter = served[2] / "outputs" / "alpha" / "sbora-fa" / "adapter.safetensors"
    assert httpx.get(f"{url}gradio_api/file={adapter}").status_code == 403  # nothing is served from the outputs folder
    answers(client)
    # A text file named .png is not an image.
    fake = tmp_path / "fake.png"
    fake.write_text("this is not a picture\n" * 20)
    with pytest.raises(AppError, match=r"photo 3 \(fake.png\) is not an image"):
        client.predict(name="gamma", class_word="toy", photos=[handle_file(str(p)) for p in [*sorted(good.iterdir())[:2], fake]],
                       api_name="/train")
    answers(client)
    with pytest.raises(AppError, match="concept name '../evil' is not allowed"):
        client.predict(name="../evil", class_word="toy", photos=[handle_file(str(p)) for p in sorted(good.iterdir())], api_name="/train")
    answers(client)
    assert not (served[2] / "outputs" / "gamma").exists() and not list(served[2].rglob("evil*"))


def test_the_page_in_headless_chromium(served, tmp_path):
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is missing: make install puts it in (apt-get install chromium)")
    _, url, _ = served
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.get_by_label("use alpha/sbora-fa").check(timeout=60_000)
            page.get_by_label("use beta/sbora-fa").check()
            page.locator("#prompt textarea").fill("a photo of <alpha1> toy and <beta1> toy on the beach")
            # alpha's region: a stroke painted on its sketchpad (the drawing square sits in the canvas' middle)
            page.get_by_text("Region (optional)").first.click()
            page.locator(".region-sketch button[aria-label='Brush']").first.click()
            box = page.locator(".region-sketch canvas").first.bounding_box()
            x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
            page.mouse.move(x - 20, y - 40)
            page.mouse.down()
            page.mouse.move(x + 10, y + 40, steps=8)
            page.mouse.up()
            page.locator("#generate").click()
            page.locator("#gallery img").first.wait_for(timeout=120_000)
            page.get_by_text("image(s) in").wait_for(timeout=30_000)
            info = page.locator("#info").inner_text()
            assert "alpha/sbora-fa+beta/sbora-fa" in info and "on the beach" in info and "Regions: alpha/sbora-fa sketch" in info
            shot = tmp_path / "app.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert Image.open(shot).size[0] == 1400


def test_training_in_the_background_and_the_new_concept_without_a_restart(served, client, tmp_path):
    studio, _, root = served
    assert studio.next_slot() == 2
    # A long run keeps training while the app generates; Stop ends it at a step boundary, publishing nothing.
    job = studio.start_training(example="robot", method="sbora-fa", rank=4, steps=1000)
    answers(client)
    assert job.status == "running"
    with pytest.raises(AppInputError, match="a training run is going on"):
        studio.start_training(example="robot", steps=2)
    studio.stop_training()
    assert job.finished.wait(120) and job.status == "stopped" and job.step < 1000
    assert not (root / "outputs" / "robot" / "sbora-fa" / "adapter.safetensors").exists()
    # Upload photos, train (slot proposed), and generate with the new concept at once.
    files = [handle_file(str(p)) for p in sorted(photos(tmp_path / "photos", "gamma", 3).iterdir())]
    result = client.predict(name="gamma", class_word="toy", photos=files, rank=4, api_name="/train")
    assert result["concept"] == "gamma/sbora-fa" and result["status"] == "done" and result["step"] == 2
    assert studio.cards()["gamma/sbora-fa"].slot == 2 and studio.next_slot() == 3
    assert sorted(p.name for p in (root / "outputs" / "gamma" / "photos").iterdir()) == ["photo_00.png", "photo_01.png", "photo_02.png"]
    out, info = generate(client, prompt="a photo of <gamma1> toy", concepts={"gamma/sbora-fa": 1.0, "alpha/sbora-fa": 1.0})
    assert len(out) == 1 and info["overlap"][0]["max_interference"] == 0
    with pytest.raises(AppError, match="already holds a run.*--overwrite"):
        client.predict(name="gamma", class_word="toy", photos=files, api_name="/train")
    answers(client)


def test_studio_refuses_bad_requests_before_doing_anything(served):
    studio, _, root = served
    three = [str(p) for p in sorted((root / "photos" / "alpha").iterdir())]
    cases = [
        (dict(name="train", class_word="toy", photos=three), "is not allowed"),
        (dict(name="a b", class_word="toy", photos=three), "is not allowed"),
        (dict(name="ok", class_word="{token}", photos=three), "class word"),
        (dict(name="ok", class_word="toy", photos=three[:2]), "upload 3 to 20 photos"),
        (dict(name="ok", class_word="toy", photos=three, method="nope"), "unknown method"),
        (dict(name="ok", class_word="toy", photos=three, rank=0), "rank must be"),
        (dict(name="ok", class_word="toy", photos=three, slot=-1), "slot must be"),
        (dict(name="ok", class_word="toy", photos=three, steps=10**7), "steps must be"),
        (dict(example="../robot"), "no example concept"),
        (dict(example="robot", photos=three), "not both"),
        (dict(name="alpha2", class_word="toy", photos=three, steps=float("nan")), "steps must be"),
    ]
    for kwargs, message in cases:
        with pytest.raises(AppInputError, match=message):
            studio.start_training(**kwargs)
    assert not (root / "outputs" / "ok").exists() and not (root / "outputs" / "alpha2").exists()
    requests = [
        (dict(concepts={"alpha/sbora-fa": 9.0}), "weight of alpha/sbora-fa must be"),
        (dict(concepts={"alpha/sbora-fa": 1.0}, regions={"beta/sbora-fa": "0,0,1,1"}), "not switched on"),
        (dict(concepts={"alpha/sbora-fa": 1.0}, seed=-1), "seed must be"),
        (dict(concepts={"alpha/sbora-fa": 1.0}, num_images=99), "number of images"),
        (dict(concepts={f"c{i}/m": 1.0 for i in range(9)}), "at most 8 concepts"),
        (dict(concepts=["alpha/sbora-fa"]), "must map concept names"),
        (dict(concepts={}, prompt=""), "write a prompt"),
        (dict(concepts={"alpha/sbora-fa": 1.0}, prompt="x" * 5000), "longer than"),
    ]
    for kwargs, message in requests:
        with pytest.raises(AppInputError, match=message):
            studio.generate(**{"prompt": "a photo", **kwargs})
    images, info = studio.generate("", {"alpha/sbora-fa": 1.0}, steps=1)  # empty prompt: the chosen concepts
    assert info["prompt"] == "a photo of <alpha1> toy" and len(images) == 1
