"""The HTTP service in-process (TestClient) and as a real server on loopback driven by headless Chromium."""

import asyncio
import base64
import io
import json
import re

import httpx
import numpy as np
import pytest
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from PIL import Image

from klgrade.data.preprocess import SIDE_UNKNOWN
from klgrade.serve.app import Settings, create_app
from klgrade.serve.local import local_server

from helpers import EXAMPLES, invoke_cli, knee_image, mirroring_left_knees, write_dicom

EXAMPLE = sorted(EXAMPLES.glob("KL3_*.jpg"))[0]


@pytest.fixture(scope="module")
def client(tiny_checkpoint):
    app = create_app(Settings(checkpoints=[str(tiny_checkpoint)], max_upload_bytes=2 * 2**20))
    with TestClient(app) as test_client:
        yield test_client


def test_health_model_and_docs(client):
    assert client.get("/v1/health").json() == {"status": "ok", "model_loaded": True}
    model = client.get("/v1/model").json()
    assert model["name"] == "msa_net" and model["image_size"] == 64 and "val_metrics" in model["card"]
    assert "/v1/grade" in client.get("/openapi.json").json()["paths"]
    assert "Grad-CAM" in client.get("/").text


def test_grade_a_real_radiograph_with_heatmap(client):
    response = client.post("/v1/grade?explain=true", files={"file": (EXAMPLE.name, EXAMPLE.read_bytes(), "image/jpeg")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert 0 <= body["grade"] <= 4 and len(body["probabilities"]) == 5
    assert abs(sum(body["probabilities"]) - 1) < 1e-4
    assert body["confidence"] == pytest.approx(max(body["probabilities"]))
    heatmap = Image.open(io.BytesIO(base64.b64decode(body["heatmap_png"])))
    assert heatmap.size[0] >= 224
    plain = client.post("/v1/grade", files={"file": ("x.jpg", EXAMPLE.read_bytes(), "image/jpeg")}).json()
    assert plain["heatmap_png"] is None and plain["grade"] == body["grade"]
    # The heatmap downloaded and uploaded again is refused, not graded as a knee.
    again = client.post("/v1/grade", files={"file": ("h.png", base64.b64decode(body["heatmap_png"]), "image/png")})
    assert again.status_code == 422 and "a klgrade heatmap (Grad-CAM overlay), not a radiograph" in again.text


def test_dicom_upload_is_graded_and_patient_fields_never_returned(client, tmp_path):
    path = write_dicom(tmp_path / "k.dcm", knee_image().astype(np.uint16) * 10, "MONOCHROME1")
    response = client.post("/v1/grade", files={"file": ("k.dcm", path.read_bytes(), "application/dicom")})
    assert response.status_code == 200
    assert "SECRET-42" not in response.text and "Doe" not in response.text


@pytest.mark.parametrize("payload, content_type, status", [
    (b"hello, I am text", "text/plain", 415),
    (b"\x89PNG\r\n\x1a\n broken", "image/png", 422),
    (b"", "image/png", 422),
])
def test_garbage_gets_4xx_with_detail(client, payload, content_type, status):
    response = client.post("/v1/grade", files={"file": ("f", payload, content_type)})
    assert response.status_code == status
    assert isinstance(response.json()["detail"], str)


def test_oversized_upload_is_413_and_missing_file_422(client):
    big = b"\0" * (3 * 2**20)
    response = client.post("/v1/grade", files={"file": ("big.png", big, "image/png")})
    assert response.status_code == 413 and "larger" in response.json()["detail"]
    assert client.post("/v1/grade").status_code == 422


def test_two_files_in_one_request_are_refused_not_one_graded_unsaid(client):
    """One answer per request: with two `file` parts the last alone was graded, and the caller could not tell which."""
    knees = sorted(EXAMPLES.glob("*.jpg"))[:2]
    response = client.post("/v1/grade", files=[("file", (p.name, p.read_bytes(), "image/jpeg")) for p in knees])
    assert response.status_code == 422 and response.json()["detail"] == "one radiograph per request, not 2 files"


@pytest.fixture(scope="module")
def server(calibrated):
    with local_server("--checkpoint", str(calibrated)) as running:
        yield running.url


def test_real_server_on_loopback(server):
    response = httpx.post(f"{server}/v1/grade", files={"file": (EXAMPLE.name, EXAMPLE.read_bytes(), "image/jpeg")},
                          timeout=30)
    assert response.status_code == 200 and 0 <= response.json()["grade"] <= 4
    junk = httpx.post(f"{server}/v1/grade", files={"file": ("a.txt", b"junk", "text/plain")}, timeout=30)
    assert junk.status_code == 415


@pytest.fixture(scope="module")
def browser():
    """Debian's headless Chromium, driven by Selenium (one per module: starting it takes seconds)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(flag)
    options.add_argument("--window-size=1280,900")
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    yield driver
    driver.quit()


@pytest.mark.browser
def test_web_page_in_headless_chromium(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    driver.get(server + "/")
    driver.find_element(By.ID, "file-input").send_keys(str(EXAMPLE.resolve()))
    wait = WebDriverWait(driver, 60)
    wait.until(ec.text_to_be_present_in_element((By.ID, "grade"), "KL"))
    grade_text = driver.find_element(By.ID, "grade").text
    assert grade_text.startswith("KL ") and int(grade_text.split()[1]) in range(5)
    assert len(driver.find_elements(By.CSS_SELECTOR, "#probabilities .bar-row")) == 5
    wait.until(lambda d: d.execute_script(
        "const i = document.getElementById('heatmap'); return i.complete && i.naturalWidth > 0;"))
    assert driver.find_element(By.ID, "heatmap").is_displayed()
    assert driver.find_element(By.ID, "error").text == ""
    assert "with 90% confidence" in driver.find_element(By.ID, "grade-set").text
    assert driver.find_elements(By.CSS_SELECTOR, "#warnings li") == []
    assert driver.save_screenshot(str(tmp_path / "page.png"))
    blank = tmp_path / "blank.png"
    Image.fromarray(np.zeros((128, 128), np.uint8)).save(blank)
    driver.find_element(By.ID, "file-input").send_keys(str(blank))
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "Graded blank.png"))
    assert driver.find_element(By.ID, "grade").text.endswith("?")
    warnings = [item.text for item in driver.find_elements(By.CSS_SELECTOR, "#warnings li")]
    assert any("not gradable" in text and "blank" in text for text in warnings), warnings
    assert driver.save_screenshot(str(tmp_path / "page_blank.png"))


@pytest.mark.browser
def test_web_page_shows_no_answer_but_the_latest_file_s(server, browser, tmp_path):
    """A grade on the page is only ever the latest chosen file's, named: a file that fails takes the previous answer
    away, and an earlier file's answer arriving late (here held back 3 s) does not replace a later file's."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver, wait = browser, WebDriverWait(browser, 60)
    driver.get(server + "/")
    file_input = driver.find_element(By.ID, "file-input")
    file_input.send_keys(str(EXAMPLE.resolve()))
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), f"Graded {EXAMPLE.name}"))
    assert driver.find_element(By.ID, "graded-file").text == EXAMPLE.name
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    file_input.send_keys(str(broken))
    wait.until(ec.text_to_be_present_in_element((By.ID, "error"), "Could not grade broken.png"))
    assert not driver.find_element(By.ID, "result").is_displayed()
    assert not driver.find_element(By.ID, "heatmap").is_displayed()
    driver.execute_script("""
        const send = window.fetch; let uploads = 0; window.lateAnswered = false;
        window.fetch = (url, options) => {
            const first = ++uploads === 1;
            return new Promise(done => setTimeout(done, first ? 3000 : 0)).then(() => send(url, options))
                .then(response => { if (first) setTimeout(() => { window.lateAnswered = true; }, 500); return response; });
        };""")
    blank = tmp_path / "blank.png"
    Image.fromarray(np.zeros((128, 128), np.uint8)).save(blank)
    file_input.send_keys(str(EXAMPLE.resolve()))  # held back 3 s
    file_input.send_keys(str(blank))
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "Graded blank.png"))
    wait.until(lambda d: d.execute_script("return window.lateAnswered"))  # the example's answer came, and was read
    assert driver.find_element(By.ID, "graded-file").text == "blank.png"
    assert driver.find_element(By.ID, "grade").text.endswith("?")
    assert driver.find_element(By.ID, "status").text == "Graded blank.png"


@pytest.mark.browser
def test_the_api_docs_need_no_network(server, browser):
    """FastAPI's /docs and /redoc load Swagger UI and ReDoc from CDNs (and fonts from Google): blank on a hospital
    network with no way out, and every visit announced to third parties. Every file they load comes from the
    service itself, and Swagger UI renders the grading endpoint from them."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    for page in ("/docs", "/redoc"):
        html = httpx.get(server + page, timeout=30)
        assert html.status_code == 200
        loaded = re.findall(r'(?:src|href)=["\']([^"\']+)', html.text)
        assert loaded and not [url for url in loaded if "://" in url and not url.startswith(server)], loaded
        for url in loaded:
            assert httpx.get(server + url if url.startswith("/") else url, timeout=30).status_code == 200, url
    browser.get(server + "/docs")
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"))
    paths = {item.text for item in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert "/v1/grade" in paths


def test_uploads_held_at_once_are_bounded_and_the_rest_wait_their_turn():
    """Every request's body and its copies live until it is answered: the service holds at most `held_bytes` of
    them, all requests together (40 concurrent uploads of 30 MiB took a server from 0.8 to 4.7 GB). A request that
    does not fit waits, unread, until answers make room, and gets 503 when none is made within the timeout."""
    from klgrade.serve.app import BodyLimits

    state = {}

    async def app(scope, receive, send):  # holds every request until `answer` is set
        state["entered"].append(len((await receive())["body"]))
        await state["answer"].wait()
        await JSONResponse({"ok": True})(scope, receive, send)

    limits = BodyLimits(app, max_bytes=10, timeout_s=0.5, held_bytes=20)

    async def scenario():
        entered, answer = state["entered"], state["answer"] = [], asyncio.Event()

        def post(size: int):
            sent = []

            async def receive():
                return {"type": "http.request", "body": b"x" * size, "more_body": False}

            async def send(message):
                sent.append(message)

            scope = {"type": "http", "method": "POST", "headers": [(b"content-length", str(size).encode())]}
            return asyncio.create_task(limits(scope, receive, send)), sent

        first, second = post(10), post(10)
        await asyncio.sleep(0.05)
        waiting = post(5)
        await asyncio.sleep(0.2)
        assert entered == [10, 10]  # no room for the third yet: its body is not read
        answer.set()
        await asyncio.gather(first[0], second[0], waiting[0])
        assert entered == [10, 10, 5] and waiting[1][0]["status"] == 200
        answer.clear()
        held = [post(10), post(10)]
        await asyncio.sleep(0.05)
        refused = post(1)
        await refused[0]
        assert refused[1][0]["status"] == 503 and len(entered) == 5
        assert json.loads(refused[1][1]["body"]) == {"detail": "too many uploads in progress; try again shortly"}
        answer.set()
        await asyncio.gather(*(task for task, _ in held))
        assert limits.room.held == 0

    asyncio.run(scenario())
    asyncio.run(scenario())  # the same app on another event loop (a second TestClient, a restarted server)


def test_serve_refuses_a_held_bound_smaller_than_one_upload():
    result = invoke_cli("serve", "--max-upload-mb", "8", "--max-held-mb", "4", "--port", "0")
    assert result.returncode == 1 and result.stderr == (
        "error: --max-held-mb 4 leaves no room for an upload of --max-upload-mb 8\n")


def test_cli_and_service_grade_the_same_file_the_same_way(tiny_checkpoint, tmp_path):
    """One path from input to grade: the upload's file name gives the side (and marks DICOM) as a path does."""
    from klgrade.models.weights import read_info

    sided = mirroring_left_knees(tiny_checkpoint, tmp_path / "sided.safetensors")  # the name changes the answer
    assert read_info(sided)["preprocess"]["canonical_side"]
    ramp = np.tile(np.linspace(0, 255, 96), (96, 1)).astype(np.uint8)
    ramp[20:40, 10:30] = 0
    left = tmp_path / "9003175L.png"
    Image.fromarray(ramp).save(left)
    dicom = write_dicom(tmp_path / "IMG0001", ramp.astype(np.uint16) * 16, "MONOCHROME2")
    result = invoke_cli("predict", str(left), str(dicom), "--checkpoint", str(sided), "--format", "json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    app = create_app(Settings(checkpoints=[str(sided)]))
    with TestClient(app) as test_client:
        for row, path in zip(rows, (left, dicom)):
            body = test_client.post("/v1/grade", files={"file": (path.name, path.read_bytes(), "application/octet-stream")}).json()
            assert body["grade"] == row["grade"]
            assert (SIDE_UNKNOWN in body["warnings"]) == (SIDE_UNKNOWN in row["warnings"]) == (path == dicom)
            np.testing.assert_allclose(body["probabilities"], [row[f"prob_{k}"] for k in range(5)], atol=1e-5)
        unsided = test_client.post("/v1/grade", files={"file": ("knee.png", left.read_bytes(), "image/png")}).json()
    assert np.abs(np.array(unsided["probabilities"]) - [rows[0][f"prob_{k}"] for k in range(5)]).max() > 1e-4


def test_the_service_runs_on_the_device_asked_for_and_refuses_one_it_has_not(tiny_checkpoint):
    """`serve` had no --device (predict and evaluate have): a GPU server graded on its CPU."""
    refused = invoke_cli("serve", "--port", "0", "--checkpoint", str(tiny_checkpoint), "--device", "tpu")
    assert (refused.returncode, refused.stderr) == (1, "error: --device 'tpu' is not a device (use cpu or cuda)\n")
    with TestClient(create_app(Settings(checkpoints=[str(tiny_checkpoint)], device="cpu"))) as client:
        assert client.app.state.predictor.device.type == "cpu"
        graded = client.post("/v1/grade", files={"file": (EXAMPLE.name, EXAMPLE.read_bytes(), "image/jpeg")})
        assert graded.status_code == 200, graded.text
