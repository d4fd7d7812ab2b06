"""The Gradio app on the embedded tiny pipeline: its checks, its API through gradio_client, and the
page itself in headless Chromium (Debian's chromium, driven by Python playwright)."""

from __future__ import annotations

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import copy
import io
import json
import re
import shutil
import socket
import time

import httpx
import numpy as np
import pytest
from concept_helpers import QUICK_YAML, photos, train_tiny_concept
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from sbora_diffusion.app import (GUIDANCE_RANGE, WEIGHT_RANGE, AppConfig, AppInputError, Studio, TrainJob, for_page, launch, method_defaults,
                             overlap_markdown, train_status)

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


def test_regional_mode_through_gradio_client(client):
    """regional_mode (regional.MODES) reaches the composer: a box confines alpha in cross-attention only (cross) or in
    the whole UNet (latent, the default), and the two give different images of one seed; an unknown mode is refused."""
    box = dict(regions={"alpha/sbora-fa": [0, 0, 0.5, 1]}, region_prompts={"alpha/sbora-fa": "a photo of <alpha1> toy"}, seed=3)
    pixels = {}
    for mode in ("cross", "attention", "latent", None):
        files, info = generate(client, **box, **({} if mode is None else {"regional_mode": mode}))
        assert info["regional_mode"] == (mode or "latent") and info["regions"] == {"alpha/sbora-fa": [0, 0, 0.5, 1]}
        pixels[mode] = np.asarray(Image.open(files[0])).astype(int)
    assert np.abs(pixels["cross"] - pixels["latent"]).max() > 8  # Mix-of-Show's cross-attention only vs the whole UNet
    assert np.array_equal(pixels[None], pixels["latent"])  # the default
    _, info = generate(client, seed=3, regional_mode="cross")  # no region: recorded, nothing to confine
    assert info["regional_mode"] == "cross" and info["regions"] == {}
    for bad in ("global", "", "LATENT"):
        with pytest.raises(AppError, match=re.escape("regional mode must be one of cross, attention, latent (where a region confines "
                                                     "its concept: cross: cross-attention only; attention: the attention layers; "
                                                     "latent: the whole UNet), got ")):
            generate(client, **box, regional_mode=bad)
    answers(client)


def test_the_overlap_report_gives_weight_overlap_and_output_crosstalk(client):
    """Two concepts trained in disjoint slots: no weight overlap, but an output cross-talk on calibration inputs above 0
    in both directions (real activations have something in every input direction), named with the page's ids."""
    _, info = generate(client, seed=1)
    (pair,) = info["overlap"]
    alpha, beta = "alpha/sbora-fa", "beta/sbora-fa"
    assert pair["pair"] == f"{alpha}+{beta}" and pair["max_interference"] == 0 and pair["shared_indices"] == 0
    talk = {(d["update"], d["inputs"]): d for d in pair["crosstalk"]}
    assert sorted(talk) == [(alpha, beta), (beta, alpha)]
    for d in talk.values():
        assert d["layers"] > 0 and d["worst_layer"]
        for key in ("median", "max", "overall"):
            assert isinstance(d[key], float) and np.isfinite(d[key]) and d[key] > 0, (key, d)
        assert d["max"] >= d["median"]
    assert pair["median_crosstalk"] == pytest.approx(max(d["median"] for d in talk.values()))
    assert pair["max_crosstalk"] == pytest.approx(max(d["max"] for d in talk.values()))
    assert set(info["crosstalk_calibration"]) == {alpha, beta} and info["crosstalk_skipped"] is None
    text = overlap_markdown(info)
    assert ("| concepts | weight overlap (max interference) | layers above | shared indices | output cross-talk on calibration inputs "
            "(median over layers) | max cross-talk (layer) |") in text
    row = next(line for line in text.splitlines() if line.startswith("| alpha/sbora-fa\\+beta/sbora-fa |"))
    for (update, inputs), d in talk.items():
        assert f"{update} on {inputs}'s inputs: {d['median']:.3g}" in row
    assert f"| {pair['max_crosstalk']:.3g} (" in row
    # The two texts under the table say what each measure guarantees (escaped for Markdown, as the page shows them).
    assert "Weight overlap \\(interference, 0..1, from the adapters' factors\\)" in text
    assert "Output cross-talk on calibration inputs: \\|dW\\_j X\\_i\\| / \\|dW\\_i X\\_i\\| per layer" in text
    _, alone = generate(client, prompt="a photo of <alpha1> toy", concepts={alpha: 1.0})
    assert alone["overlap"] == [] and "cross-talk" not in overlap_markdown(alone)


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


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's, driven by Python playwright; never `playwright install`), one per module."""
    from playwright.sync_api import sync_playwright

    found = [shutil.which(c) for c in (os.environ.get("CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome") if c]
    chromium = next((c for c in found if c), None)
    if chromium is None:
        pytest.fail("no Chromium found (CHROMIUM, chromium, chromium-browser, google-chrome): make test installs Debian's where it may "
                    "(scripts/ensure-chromium.sh), or set CHROMIUM=/path/to/chrome")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def test_the_page_in_headless_chromium(served, browser, tmp_path):
    _, url, _ = served
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
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
        assert "alpha/sbora-fa+beta/sbora-fa" in info and "on the beach" in info
        assert "Regions (mode latent: each concept confined in the whole UNet): alpha/sbora-fa sketch" in info
        # The overlap table: both measures, the cross-talk numbers per direction, and what each guarantees below it.
        assert "weight overlap (max interference)" in info and "output cross-talk on calibration inputs (median over layers)" in info
        for update, inputs in (("beta", "alpha"), ("alpha", "beta")):
            value = float(re.search(rf"{update}/sbora-fa on {inputs}/sbora-fa's inputs: ([\d.e+-]+)", info).group(1))
            assert np.isfinite(value) and value > 0
        assert "Weight overlap (interference, 0..1, from the adapters' factors)" in info
        assert "Output cross-talk on calibration inputs: |dW_j X_i| / |dW_i X_i| per layer" in info
        shot = tmp_path / "app.png"
        page.screenshot(path=str(shot), full_page=True)
    finally:
        page.close()
    assert Image.open(shot).size[0] == 1400


def typed(page, label: str, value) -> None:
    """Type `value` into the field labelled `label` as a user does: select it, type, press Enter, leave the field."""
    field = page.get_by_label(label, exact=True)
    field.fill(str(value))
    field.press("Enter")
    field.blur()


def dragged(page, label: str, fraction: float) -> float:
    """Drag slider `label`'s handle from its value to `fraction` of its track with the mouse; the value it lands on."""
    track = page.get_by_label(f"range slider for {label}", exact=True)
    box = track.bounding_box()
    low, high, now = (float(track.get_attribute("min")), float(track.get_attribute("max")), float(track.input_value()))
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * (now - low) / (high - low), y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * fraction, y, steps=8)
    page.mouse.up()
    page.mouse.move(0, 0)
    return float(track.input_value())


def generated(page, before: str, count: int) -> tuple[str, list[np.ndarray]]:
    """Click Generate and wait for the new result: the info text and the images the gallery shows (as pixels)."""
    from playwright.sync_api import expect

    text = page.locator("#info [data-testid='markdown']")  # the text alone, without the progress shown over it
    page.locator("#generate").click()
    expect(text).not_to_have_text(before, timeout=120_000)
    expect(page.locator("#gallery img")).to_have_count(count)
    info = text.inner_text()
    shown = page.locator("#gallery img")
    # Fetched by the page itself: Chromium retries a request on a kept-alive socket the server has just closed, where
    # page.request (Node's agent) reuses it and fails with "socket hang up" (uvicorn closes idle sockets after 5 s).
    fetch = "async src => Array.from(new Uint8Array(await (await fetch(src)).arrayBuffer()))"
    images = [np.asarray(Image.open(io.BytesIO(bytes(page.evaluate(fetch, shown.nth(i).get_attribute("src"))))).convert("RGB"))
              for i in range(count)]
    return info, images


def test_every_generate_control_changes_what_is_generated_in_chromium(served, browser, client, tmp_path):
    """Each control of the Generate tab, typed or dragged, keeps its value and changes the result: the settings in the
    info text and the pixels (issue 25: the sliders did not move)."""
    from playwright.sync_api import expect

    _, url, _ = served
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(url)
        page.get_by_label("use alpha/sbora-fa").check(timeout=60_000)
        controls = ["Seed", "number input for Steps", "range slider for Steps", "number input for Guidance", "range slider for Guidance",
                    "number input for Images", "range slider for Images", "use beta/sbora-fa"]
        controls += [f"{kind} slider for weight of {c}".replace("number slider", "number input") for c in ("alpha/sbora-fa", "beta/sbora-fa")
                     for kind in ("range", "number")]
        for label in controls:
            assert page.get_by_label(label, exact=True).is_enabled(), f"{label} is locked"
        assert page.locator("#prompt textarea").is_editable() and page.locator("#negative textarea").is_editable()

        typed(page, "number input for Steps", 3)
        page.locator("#prompt textarea").fill("a photo of <alpha1> toy")
        time.sleep(1.5)  # past a tick of the page's one-second timer: nothing writes the values back
        assert page.get_by_label("number input for Steps").input_value() == "3" and page.get_by_label("range slider for Steps").input_value() == "3"
        info, images = generated(page, "", 1)
        assert "1 image(s)" in info and "seeds 0–0" in info and "steps 3 · guidance 7.5" in info and "alpha/sbora-fa ×1" in info
        assert images[0].shape == (256, 256, 3)  # 64 px shown at 4x (whole pixels)

        def changed(before: list[np.ndarray], after: list[np.ndarray]) -> bool:
            return not np.array_equal(before[0], after[0])

        typed(page, "number input for Steps", 5)  # steps, typed
        info, new = generated(page, info, 1)
        assert "steps 5 ·" in info and changed(images, new)
        images = new
        guidance = dragged(page, "Guidance", 0.25)  # guidance, dragged
        assert guidance != 7.5 and page.get_by_label("number input for Guidance").input_value() == f"{guidance:g}"
        info, new = generated(page, info, 1)
        assert f"guidance {guidance:g} ·" in info and changed(images, new)
        images = new
        typed(page, "number input for weight of alpha/sbora-fa", 0.5)  # a concept's weight, typed
        info, new = generated(page, info, 1)
        assert "alpha/sbora-fa ×0.5" in info and changed(images, new)
        images = new
        page.get_by_label("use beta/sbora-fa").check()  # another concept switched on, its weight dragged
        beta = dragged(page, "weight of beta/sbora-fa", 0.3)
        assert 0 < beta < 1
        info, new = generated(page, info, 1)
        assert float(re.search(r"beta/sbora-fa ×([\d.]+)", info).group(1)) == pytest.approx(beta) and changed(images, new)
        images = new
        typed(page, "Seed", 7)  # seed, typed
        info, new = generated(page, info, 1)
        assert "seeds 7–7" in info and changed(images, new)
        images = new
        page.locator("#prompt textarea").fill("a photo of <alpha1> toy and <beta1> toy on the beach")  # prompt
        info, new = generated(page, info, 1)
        assert "on the beach" in info and changed(images, new)
        images = new
        count = dragged(page, "Images", 1.0)  # images, dragged to the end: seeds 7-10, image k is seed k whatever the batch
        assert count == 4
        info, new = generated(page, info, 4)
        assert "4 image(s)" in info and "seeds 7–10" in info and np.abs(new[0].astype(int) - images[0]).max() <= 1
        images = new

        # Typed and dragged values stick, through the timer's ticks and a re-listing of the concepts (Refresh).
        page.get_by_role("button", name="Refresh concepts").click()
        time.sleep(2)
        expect(page.get_by_label("use alpha/sbora-fa")).to_be_checked()
        assert page.get_by_label("number input for weight of alpha/sbora-fa").input_value() == "0.5"
        assert float(page.get_by_label("number input for weight of beta/sbora-fa").input_value()) == pytest.approx(beta)
        assert [page.get_by_label(f"number input for {c}").input_value() for c in ("Steps", "Guidance", "Images")] == ["5", f"{guidance:g}", "4"]
        assert page.get_by_label("Seed").input_value() == "7"

        # The page made exactly what the API makes from the same values (the page shows each pixel as a 4x4 square).
        files, _ = client.predict(prompt="a photo of <alpha1> toy and <beta1> toy on the beach", seed=7, steps=5, guidance_scale=guidance,
                                  num_images=4, concepts={"alpha/sbora-fa": 0.5, "beta/sbora-fa": beta}, api_name="/generate")
        for mine, theirs in zip(images, files):
            assert np.abs(mine[::4, ::4].astype(int) - np.asarray(Image.open(theirs).convert("RGB"))).max() <= 1

        # Each image is shown whole: inside the gallery, below its label and buttons, and its screenshot is the picture.
        gallery = page.locator("#gallery").bounding_box()
        overlays = [page.locator("#gallery label").first.bounding_box()]
        overlays += [b.bounding_box() for b in page.locator("#gallery button.icon-button").all() if b.is_visible()]
        for i in range(4):  # (all boxes measured before a screenshot scrolls the page)
            box = page.locator("#gallery img").nth(i).bounding_box()
            assert gallery["x"] <= box["x"] and box["x"] + box["width"] <= gallery["x"] + gallery["width"] + 1
            assert gallery["y"] <= box["y"] and box["y"] + box["height"] <= gallery["y"] + gallery["height"] + 1
            assert all(o["y"] + o["height"] <= box["y"] or o["x"] + o["width"] <= box["x"] or o["x"] >= box["x"] + box["width"]
                       for o in overlays if o is not None), (box, overlays)
        for i in range(4):
            shot = tmp_path / f"gallery-{i}.png"
            page.locator("#gallery img").nth(i).screenshot(path=str(shot))
            seen = np.asarray(Image.open(shot).convert("RGB").resize((64, 64), Image.Resampling.BOX)).astype(int)
            truth = images[i][::4, ::4].astype(int)
            for rows in (slice(0, 32), slice(32, 64)):  # every quarter of the picture is on the screen
                for cols in (slice(0, 32), slice(32, 64)):
                    assert np.abs(seen[rows, cols] - truth[rows, cols]).mean() < 12
        page.locator("#gallery").screenshot(path=str(tmp_path / "gallery.png"))

        # The on/off switch: beta off (its token still in the prompt: the page warns), then its weight no longer counts.
        page.get_by_label("use beta/sbora-fa").uncheck()
        info, new = generated(page, info, 4)
        assert "beta/sbora-fa ×" not in info and "the prompt holds <beta1>, the token of beta/sbora-fa, which is switched off" in info
        assert changed(images, new)
        images = new

        # Where a region confines its concept: a box for alpha (the whole UNet by default), then cross-attention only.
        modes = page.locator("#regional-mode")
        expect(modes.get_by_label("the whole UNet (latent)", exact=True)).to_be_checked()
        for label in ("the whole UNet (latent)", "the attention layers (attention)", "cross-attention only (cross)"):
            assert modes.get_by_label(label, exact=True).is_enabled(), f"{label} is locked"
        page.get_by_text("Region (optional)").first.click()
        box = page.get_by_label("Box x0, y0, x1, y1 (fractions of the image, e.g. 0, 0, 0.5, 1)", exact=True).first  # alpha's
        box.fill("0, 0, 0.5, 1")
        box.blur()
        info, new = generated(page, info, 4)
        assert "Regions (mode latent: each concept confined in the whole UNet): alpha/sbora-fa (0.0, 0.0, 0.5, 1.0)" in info
        assert changed(images, new)
        images = new
        modes.get_by_label("cross-attention only (cross)", exact=True).check()
        info, new = generated(page, info, 4)
        assert "Regions (mode cross: each concept confined in cross-attention only): alpha/sbora-fa" in info and changed(images, new)
        page.get_by_role("button", name="Refresh concepts").click()  # the choice stays through a re-listing
        time.sleep(2)
        expect(modes.get_by_label("cross-attention only (cross)", exact=True)).to_be_checked()
        # The page's images are the API's with the same mode (the page shows each pixel as a 4x4 square).
        files, _ = client.predict(prompt="a photo of <alpha1> toy and <beta1> toy on the beach", seed=7, steps=5, guidance_scale=guidance,
                                  num_images=4, concepts={"alpha/sbora-fa": 0.5}, regions={"alpha/sbora-fa": [0, 0, 0.5, 1]},
                                  regional_mode="cross", api_name="/generate")
        for mine, theirs in zip(new, files):
            assert np.abs(mine[::4, ::4].astype(int) - np.asarray(Image.open(theirs).convert("RGB"))).max() <= 1
    finally:
        page.close()


def test_training_in_the_background_and_the_new_concept_without_a_restart(served, client, tmp_path):
    studio, _, root = served
    # alpha and beta hold slots 0 and 1 at rank 4 (indices 0-3 and 4-7 of each layer's order): the next free slot is 2
    # at rank 4, and 1 at sbora-fa's own rank 16 (indices 16-31).
    assert studio.next_slot("sbora-fa", 4) == 2 and studio.next_slot("sbora-fa") == studio.next_slot("sbora-fa", 16) == 1
    assert studio.next_slot("lora", 4) == 0  # LoRA has no slots
    # Replacing beta: its own slot is free for it (the page proposes it when "Replace" is ticked).
    assert studio.proposed_slot("sbora-fa", 4, "beta", overwrite=True) == 1 and studio.proposed_slot("sbora-fa", 4, "beta") == 2
    # A long run keeps training while the app generates; Stop ends it at a step boundary, publishing nothing.
    job = studio.start_training(example="robot", method="sbora-fa", rank=4, steps=1000)
    answers(client)
    assert job.status == "running"
    with pytest.raises(AppInputError, match="a training run is going on"):
        studio.start_training(example="robot", steps=2)
    studio.stop_training()
    assert job.finished.wait(120) and job.status == "stopped" and job.step < 1000
    assert "--" not in job.error and "tick “Continue” (resume=True)" in job.error and "“Replace” (overwrite=True)" in job.error
    seconds = job.summary()["seconds"]
    time.sleep(1.1)
    assert job.summary()["seconds"] == seconds  # the run's time stops when it ends
    assert not (root / "outputs" / "robot" / "sbora-fa" / "adapter.safetensors").exists()
    # Upload photos, train (slot proposed), and generate with the new concept at once.
    files = [handle_file(str(p)) for p in sorted(photos(tmp_path / "photos", "gamma", 3).iterdir())]
    result = client.predict(name="gamma", class_word="toy", photos=files, rank=4, api_name="/train")
    assert result["concept"] == "gamma/sbora-fa" and result["status"] == "done" and result["step"] == 2
    assert studio.cards()["gamma/sbora-fa"].slot == 2 and studio.next_slot("sbora-fa", 4) == 3
    assert sorted(p.name for p in (root / "outputs" / "gamma" / "photos").iterdir()) == ["photo_00.png", "photo_01.png", "photo_02.png"]
    out, info = generate(client, prompt="a photo of <gamma1> toy", concepts={"gamma/sbora-fa": 1.0, "alpha/sbora-fa": 1.0})
    assert len(out) == 1 and info["overlap"][0]["max_interference"] == 0
    with pytest.raises(AppError, match="already holds a run.*“Replace an earlier run"):
        client.predict(name="gamma", class_word="toy", photos=files, api_name="/train")
    answers(client)


def test_a_stopped_run_continues_from_its_checkpoint(tiny_pipe, tmp_path):
    """Stop, then Continue (resume=True): the run goes on from its checkpoint with its own rank and slot (not the
    page's proposals), each step logged once; a finished run goes on to more steps; what cannot continue is refused."""
    (tmp_path / "quick.yaml").write_text(QUICK_YAML)
    studio = Studio(AppConfig(outputs=str(tmp_path / "outputs"), model="tiny", train_config=str(tmp_path / "quick.yaml")),
                    pipe=copy.deepcopy(tiny_pipe))
    out = tmp_path / "outputs" / "robot" / "sbora-fa"
    try:
        with pytest.raises(AppInputError, match="robot/sbora-fa has no run to continue"):
            studio.start_training(example="robot", steps=3, resume=True)
        job = studio.start_training(example="robot", method="sbora-fa", rank=4, slot=1, steps=1000)
        while job.step < 2 and job.status == "running":
            time.sleep(0.05)
        studio.stop_training()
        assert job.finished.wait(120) and job.status == "stopped"
        stopped = int(re.search(r"stopped at step (\d+)", job.error).group(1))
        assert "tick “Continue” (resume=True)" in job.error and not (out / "adapter.safetensors").exists()
        with pytest.raises(AppInputError, match="holds an interrupted run .*tick “Continue the run from its last checkpoint” "
                                                "\\(the API's resume=True\\)"):
            studio.start_training(example="robot", steps=stopped + 2)
        with pytest.raises(AppInputError, match="not both"):
            studio.start_training(example="robot", steps=stopped + 2, overwrite=True, resume=True)
        with pytest.raises(AppInputError, match=f"at step {stopped} already: ask for more steps"):
            studio.start_training(example="robot", steps=stopped, resume=True)
        again = studio.start_training(example="robot", steps=stopped + 2, resume=True)  # rank, slot: sbora-fa's 16 and 0 proposed
        assert again.first == again.step == stopped and again.phase == "preparing"
        assert again.finished.wait(120) and again.status == "done", again.error
        assert again.step == stopped + 2 and (out / "adapter.safetensors").is_file()
        card = studio.cards()["robot/sbora-fa"]
        assert (card.rank, card.slot) == (4, 1)  # the run's own
        logged = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
        assert logged == list(range(1, stopped + 3))  # each step once, across the stop
        more = studio.start_training(example="robot", steps=stopped + 3, resume=True)  # a finished run, to one more step
        assert more.finished.wait(120) and more.status == "done" and more.step == stopped + 3
        # An uploaded concept continues on the photos its first run saved (the upload left empty).
        three = [str(p) for p in sorted(photos(tmp_path / "photos", "gamma", 3).iterdir())]
        first = studio.start_training(name="gamma", class_word="toy", photos=three, rank=4, slot=2, steps=2)
        assert first.finished.wait(120) and first.status == "done", first.error
        again = studio.start_training(name="gamma", class_word="toy", steps=3, resume=True)
        assert again.finished.wait(120) and again.status == "done" and (again.first, again.step) == (2, 3), again.error
        assert (studio.cards()["gamma/sbora-fa"].rank, studio.cards()["gamma/sbora-fa"].slot) == (4, 2)
    finally:
        studio.close()


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
        (dict(name="ok", class_word="toy", photos=three, rank=4, slot=200), "slot 200 with rank 4 needs .* but the layer has"),
        (dict(name="ok", class_word="toy", photos=three, steps=10**7), "steps must be"),
        (dict(example="../robot"), "no example concept"),
        (dict(example="robot", photos=three), "not both"),
        (dict(name="ok", class_word="toy", photos=three, resume=True), "a continued run trains on the photos it started from"),
        (dict(name="ok", class_word="toy", resume=True), "no saved photos of 'ok' to continue its run with"),
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


def test_train_status_says_what_a_run_does_and_its_time_stops_at_the_end():
    job = TrainJob(concept="x/sbora-fa", total=3)
    assert job.phase == "preparing" and "Preparing **x/sbora-fa**" in train_status(job)
    job.on_step(1, 0.5)
    assert job.phase == "training" and train_status(job).startswith("Training **x/sbora-fa**: step 1 of 3 · loss 0.5000 · ")
    job.on_step(3, 0.25)  # the last step: the trainer now saves the adapter and makes the sample images
    assert job.phase == "making samples" and "(3 of 3 steps) · making samples…" in train_status(job) and train_status(job).endswith("so far")
    job.end("done")
    text, seconds = train_status(job), job.summary()["seconds"]
    time.sleep(1.1)
    assert job.phase == "done" and train_status(job) == text and job.summary()["seconds"] == seconds and "so far" not in text
    assert text.startswith("Done: **x/sbora-fa** (3 steps) is in the Generate tab · loss 0.3750 (mean of the last 2 steps) · ")


def test_the_loss_curve_shows_each_step_and_its_running_mean():
    """The Train tab's plot and status smooth the loss (one step's swings with its noise level), over LOSS_WINDOW steps."""
    from sbora_diffusion.app import LOSS_WINDOW

    job = TrainJob(concept="x/sbora-fa", total=100, first=10)  # a continued run: its steps count on from its checkpoint
    assert job.curve() is None  # no rows yet: the plot is cleared, not sent an empty table (after which Gradio draws no lines)
    losses = [float((7 * k) % 11) for k in range(40)]
    for k, loss in enumerate(losses):
        job.on_step(11 + k, loss)
    curve = job.curve()
    raw, mean = curve[curve.series == "each step"], curve[curve.series == f"mean of {LOSS_WINDOW} steps"]
    assert list(raw.step) == list(mean.step) == list(range(11, 51)) and list(raw.loss) == losses
    assert mean.loss.iloc[0] == losses[0] and mean.loss.iloc[4] == pytest.approx(sum(losses[:5]) / 5)
    assert mean.loss.iloc[-1] == pytest.approx(sum(losses[-LOSS_WINDOW:]) / LOSS_WINDOW) == job.recent_loss()
    assert f"loss {job.recent_loss():.4f} (mean of the last {LOSS_WINDOW} steps)" in train_status(job)


def test_the_loss_readers_take_one_copy_while_the_trainer_appends():
    """The page's timer reads a job's losses while the trainer's thread appends to them: a list that grows on every
    read (as the trainer's would between two reads) still gives a plot whose columns agree, and a mean of one window."""

    class Growing(list):
        def __len__(self):
            self.append(1.0)
            return super().__len__()

        def __iter__(self):
            self.append(1.0)
            return super().__iter__()

    job = TrainJob(concept="x/sbora-fa", total=100)
    job.losses = Growing([0.5, 0.25])
    curve = job.curve()
    assert list(curve.step) == [1, 2, 1, 2] and list(curve.loss[:2]) == [0.5, 0.25]
    assert job.recent_loss() == pytest.approx(0.375)


def test_a_picture_that_does_not_decode_leaves_the_card_without_one(tmp_path, capsys):
    from sbora_diffusion.app import _thumbnail

    bad = tmp_path / "preview.png"
    bad.write_bytes(b"not a png")
    assert _thumbnail(bad) is None and "not showing" in capsys.readouterr().err
    Image.new("RGB", (1152, 156)).save(tmp_path / "samples.png")
    assert _thumbnail(tmp_path / "samples.png").size == (384, 52)


def test_a_concepts_card_shows_its_preview_else_its_sample_grid(served, tmp_path):
    """The card picture is preview.png (the adapted images); a run made before it shows samples.png; neither: none."""
    studio, _, _ = served
    card = studio.cards()["alpha/sbora-fa"]
    assert card.sample == card.path.parent / "preview.png" and card.sample.is_file()
    outputs = tmp_path / "outputs"
    run = outputs / "alpha" / "sbora-fa"
    shutil.copytree(card.path.parent, run, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    other = Studio(AppConfig(outputs=str(outputs), model="tiny"), pipe=studio.pipe)
    try:
        (run / "preview.png").unlink()
        assert other.cards()["alpha/sbora-fa"].sample == run / "samples.png"
        (run / "samples.png").unlink()
        (run / "adapter.safetensors").touch()  # a changed file: the card is read again
        assert other.cards()["alpha/sbora-fa"].sample is None
    finally:
        other.close()


def test_page_words_for_command_line_messages():
    held = ("outputs/x/sbora-fa already holds a run (adapter.safetensors): add --resume to continue it (e.g. with more steps), "
            "--overwrite to replace it (the old files stay until the new run has finished), or pass another --output-dir")
    interrupted = "outputs/x/sbora-fa holds an interrupted run (checkpoint at step 5): add --resume to continue it, --overwrite to start over, or pass another --output-dir"
    for message in (held, interrupted, "slot 3 with rank 16 needs 64 indices but the layer has 32; slots 0..1 fit at rank 16: lower --rank or --slot"):
        worded = for_page(message)
        assert "--" not in worded, worded
    assert for_page(held).endswith("tick “Continue the run from its last checkpoint” (the API's resume=True) to go on, “Replace an earlier "
                                   "run of this concept and method” (overwrite=True) to train it again from the start, or pick another "
                                   "concept name")
    assert for_page("--resume: no checkpoint") == "“Continue” (resume=True): no checkpoint"
    assert for_page("lower --rank or --slot").startswith("lower the “Rank” or the “Slot” field")


def test_one_range_per_setting_and_a_warning_for_a_switched_off_token(served, client):
    studio, _, _ = served
    # The API refuses what the page's controls cannot reach: the same bounds (WEIGHT_RANGE, GUIDANCE_RANGE, the
    # configured caps) for both; the page's sliders clamp at them (checked in Chromium above).
    assert WEIGHT_RANGE == (0.0, 2.0) and GUIDANCE_RANGE == (0.0, 20.0)
    for kwargs, message in ((dict(concepts={"alpha/sbora-fa": 2.5}), "weight of alpha/sbora-fa must be a number from 0 to 2, got 2.5"),
                            (dict(concepts={"alpha/sbora-fa": -0.1}), "weight of alpha/sbora-fa must be a number from 0 to 2"),
                            (dict(guidance_scale=25), "guidance must be a number from 0 to 20, got 25"),
                            (dict(num_images=5), "number of images must be a whole number from 1 to 4")):
        with pytest.raises(AppError, match=re.escape(message)):
            generate(client, **kwargs)
    files, info = generate(client, concepts={"alpha/sbora-fa": 2.0}, guidance_scale=20, num_images=1)  # the bounds themselves are fine
    assert info["concepts"] == {"alpha/sbora-fa": 2.0} and info["guidance_scale"] == 20 and info["steps"] == 2
    # A token in the prompt whose concept is off means nothing to the model: the answer says so.
    _, info = generate(client, prompt="a photo of <alpha1> toy and <beta1> toy", concepts={"alpha/sbora-fa": 1.0})
    assert info["warnings"] == ["the prompt holds <beta1>, the token of beta/sbora-fa, which is switched off: the token means nothing to "
                                "the model without its concept; switch beta/sbora-fa on, or take <beta1> out of the prompt"]
    _, info = generate(client, prompt="a photo of <alpha1> toy", concepts={"alpha/sbora-fa": 1.0})
    assert info["warnings"] == []


def test_training_takes_the_methods_rank_and_refuses_a_taken_slot(served, client, tmp_path):
    studio, _, root = served
    files = [handle_file(str(p)) for p in sorted(photos(tmp_path / "photos", "delta", 3).iterdir())]
    # alpha, beta, gamma: sbora-fa rank 4 in slots 0, 1, 2 (indices 0-11 of each layer's order).
    with pytest.raises(AppError, match=re.escape("slot 1 at rank 4 takes indices that beta/sbora-fa (slot 1, rank 4) already uses: the two "
                                                 "sbora-fa concepts would interfere when used together. Use slot 3, the next free one "
                                                 "for sbora-fa at rank 4")):
        client.predict(name="delta", class_word="toy", photos=files, rank=4, slot=1, api_name="/train")
    with pytest.raises(AppInputError, match=r"slot 0 at rank 8 takes indices that alpha/sbora-fa .* Use slot 2, the next free one"):
        studio.start_training(name="delta", class_word="toy", photos=[f["path"] for f in files], rank=8, slot=0)  # 0-7 vs alpha's 0-3
    with pytest.raises(AppInputError, match=r"the example 'duck' trains as concept 'duck' with class word 'toy' \(token <duck1>\)"):
        studio.start_training(example="duck", name="ducky")
    assert not (root / "outputs" / "delta").exists()
    # No rank: the method's own, as the command line (sbora-fa.yaml: 16); no slot: the next free one at that rank
    # (slot 1: indices 16-31, clear of 0-11).
    assert method_defaults("sbora-fa").rank == 16 and studio.next_slot("sbora-fa") == 1
    result = client.predict(name="delta", class_word="toy", photos=files, api_name="/train")
    assert result["status"] == "done" and result["phase"] == "done"
    card = studio.cards()["delta/sbora-fa"]
    assert [(s.method, s.rank, s.slot, s.seed, s.layout) for s in card.slots] == [("sbora-fa", 16, 1, 0, "scattered")]
    assert studio.next_slot("sbora-fa", 4) == 3 and studio.next_slot("sbora-fa", 16) == 2
    # A concept composes with the others without an overlap (its indices are its own).
    _, info = generate(client, prompt="a photo of <delta1> toy and <alpha1> toy", concepts={"delta/sbora-fa": 1.0, "alpha/sbora-fa": 1.0})
    assert info["overlap"][0]["shared_indices"] == 0 and info["warnings"] == []


def test_a_new_concept_joins_the_index_layout_of_the_trained_ones(tiny_pipe, tmp_path):
    """Concepts trained before index layouts existed use the scattered one: slots of different layouts share indices at
    random, so a new concept of that method trains in their layout, in a slot free there."""
    outputs = tmp_path / "outputs"
    train_tiny_concept(tiny_pipe, outputs, "alpha", 0, method="sbora-fb", layout="scattered")
    (tmp_path / "quick.yaml").write_text(QUICK_YAML)
    studio = Studio(AppConfig(outputs=str(outputs), model="tiny", train_config=str(tmp_path / "quick.yaml")), pipe=copy.deepcopy(tiny_pipe))
    try:
        assert studio.partition("sbora-fb")[0] == "scattered" and studio.next_slot("sbora-fb", 4) == 1
        assert studio.partition("sbora-fa")[0] == method_defaults("sbora-fa").index_layout == "scattered"  # none of that method yet
        three = [str(p) for p in sorted(photos(tmp_path / "photos" / "beta", "beta", 3).iterdir())]
        with pytest.raises(AppInputError, match=r"slot 0 at rank 4 takes indices that alpha/sbora-fb \(slot 0, rank 4\) already uses.*Use slot 1"):
            studio.start_training(name="beta", class_word="toy", photos=three, method="sbora-fb", rank=4, slot=0)
        job = studio.start_training(name="beta", class_word="toy", photos=three, method="sbora-fb", rank=4)
        assert job.finished.wait(120) and job.status == "done", job.error
        (beta,) = studio.cards()["beta/sbora-fb"].slots
        assert (beta.slot, beta.layout) == (1, "scattered")
        _, info = studio.generate("a photo of <alpha1> toy and <beta1> toy", {"alpha/sbora-fb": 1.0, "beta/sbora-fb": 1.0}, steps=1)
        assert info["overlap"][0]["shared_indices"] == 0
        # With both layouts listed, a new concept joins the larger group and the run says which concepts it cannot join.
        train_tiny_concept(tiny_pipe, outputs, "gamma", 0, method="sbora-fb", layout="blocks")
        assert studio.partition("sbora-fb")[0] == "scattered" and studio.other_layouts("sbora-fb") == ["gamma/sbora-fb"]
        job = studio.start_training(name="delta", class_word="toy", photos=three, method="sbora-fb", rank=4)
        assert job.finished.wait(120) and job.status == "done", job.error
        assert job.summary()["warning"].startswith("gamma/sbora-fb use another index layout than scattered: delta/sbora-fb cannot be used")
        assert "⚠️ gamma/sbora-fb use another index layout" in train_status(job)
        assert studio.cards()["delta/sbora-fb"].slot == 2
    finally:
        studio.close()


def test_training_from_the_page_in_chromium(served, browser):
    """The Train tab: an example fills in its name, class word and token; the method's rank and the next free slot are
    proposed; a taken slot is refused with the free one named; the status ends with a time that no longer counts."""
    from playwright.sync_api import expect

    studio, url, _ = served
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(url)
        page.get_by_label("use alpha/sbora-fa").wait_for(timeout=60_000)
        page.get_by_role("tab", name="Train").click()
        rank, slot = page.get_by_label("number input for Rank"), page.locator("#slot input")
        expect(rank).to_have_value(str(method_defaults("sbora-fa").rank))  # 16, as the command line
        expect(slot).to_have_value(str(studio.next_slot("sbora-fa")))
        page.locator("#example input").click()
        page.get_by_role("option", name="duck", exact=True).click()
        name, class_word = page.locator("#name textarea"), page.locator("#class-word textarea")
        expect(name).to_have_value("duck")
        expect(class_word).to_have_value("toy")
        expect(page.locator("#token")).to_contain_text("<duck1>")
        assert name.is_disabled() and class_word.is_disabled()  # the example's own: held while it is picked
        page.locator("#method input").click()
        page.get_by_role("option", name="lora", exact=True).click()
        expect(slot).to_have_value("0")  # LoRA has no slots
        page.locator("#method input").click()
        page.get_by_role("option", name="sbora-fa", exact=True).click()
        # As a user sees the method's proposal before typing a rank: the method's answer (its rank, its slot) would
        # replace a rank typed while it is still on its way (seen on a loaded machine: the slot stayed at rank 16's).
        expect(slot).to_have_value(str(studio.next_slot("sbora-fa")))
        typed(page, "number input for Rank", 4)
        expect(slot).to_have_value(str(studio.next_slot("sbora-fa", 4)))  # 3
        typed(page, "Slot (the next free one is proposed)", 1)
        page.locator("#train").click()
        expect(page.locator(".toast-body").first).to_contain_text("slot 1 at rank 4 takes indices that beta/sbora-fa", timeout=30_000)
        expect(page.locator(".toast-body").first).to_contain_text("Use slot 3")
        page.locator(".toast-body").first.locator("xpath=..").get_by_role("button").last.click()
        typed(page, "Slot (the next free one is proposed)", 3)
        page.locator("#train").click()
        status = page.locator("#train-status [data-testid='markdown']")  # its text, without the progress shown over it
        expect(status).to_contain_text("Done: duck/sbora-fa (2 steps) is in the Generate tab", timeout=120_000)
        text = status.inner_text()
        assert re.search(r" · \d+ s$", text), text
        time.sleep(2.5)
        assert status.inner_text() == text  # the time stopped with the run
        assert studio.cards()["duck/sbora-fa"].slot == 3 and studio.cards()["duck/sbora-fa"].rank == 4
        expect(slot).to_have_value(str(studio.next_slot("sbora-fa", 4)))  # the next proposal
        # Again without "Replace": refused, worded for the page.
        typed(page, "Slot (the next free one is proposed)", 3)
        page.locator("#train").click()
        toast = page.locator(".toast-body").filter(has_text="already holds a run")
        expect(toast).to_contain_text("“Replace an earlier run of this concept and method”", timeout=30_000)
        assert "--" not in toast.inner_text()
        # Ticking "Replace" proposes duck's own slot again (the run it replaces holds none); unticking, the next free one.
        replace = page.get_by_label("Replace an earlier run of this concept and method")
        replace.check()
        expect(slot).to_have_value("3")
        replace.uncheck()
        expect(slot).to_have_value(str(studio.next_slot("sbora-fa", 4)))  # 4
        # "Continue": the finished run goes on from its checkpoint to one more step, in its own slot.
        page.get_by_label("Continue the run from its last checkpoint").check()
        page.locator("#train-steps input").fill("3")
        page.locator("#train").click()
        expect(status).to_contain_text("Done: duck/sbora-fa (3 steps) is in the Generate tab", timeout=120_000)
        assert studio.cards()["duck/sbora-fa"].slot == 3
        page.get_by_role("tab", name="Generate").click()
        expect(page.get_by_label("use duck/sbora-fa")).to_be_visible()  # listed without a restart
    finally:
        page.close()
