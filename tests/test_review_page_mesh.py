"""The reviewers' page in a real browser: Debian's chromium, headless, driven
by Playwright (scripts/setup-browser.sh installs it; never a downloaded
browser build), through Envoy against the mesh's review service.

A reviewer opens ``/review/`` with a REVIEW key, finds an item whose model
outputs are hostile HTML and JavaScript, sees them side by side as text,
claims the item and gives a verdict with the correct label; the export has
it. The page talks to the review service's own gRPC API as gRPC-Web (Envoy's
grpc_web filter): the browser's calls are checked by the service like any
other. A key without the REVIEW scope gets the service's PERMISSION_DENIED,
shown on the page.

Set ``MLMESH_UPDATE_SCREENSHOT=1`` to refresh docs/review-page.png (the
README's picture); otherwise the screenshot goes to the test's tmp_path.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import shutil
import struct
import time
import uuid
from pathlib import Path

import aiohttp
import grpc
import pyarrow.parquet as pq
import pytest
from google.rpc import error_details_pb2, status_pb2
from mlmesh.gateway.v1 import gateway_pb2, key_service_pb2_grpc
from mlmesh.gateway.v1 import key_service_pb2 as keys_rpc
from mlmesh.registry.v1 import registry_service_pb2_grpc
from mlmesh.review.v1 import review_pb2, review_service_pb2_grpc
from mlmesh.review.v1 import review_service_pb2 as rpc
from mlmesh_review.web import CONTENT_SECURITY_POLICY, ReviewPage
from mlmesh_sdk.channel import mesh_channel
from playwright.async_api import Page, Route, async_playwright, expect
from registry_helpers import download, ref

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "review-page.png"
# Untrusted texts: a model's output and a shadow's, written to run script if
# the page ever parsed them as HTML.
HOSTILE_PRIMARY = 'Hello! <img src=x onerror="window.__pwned=1"> I am a <b>bold</b> model.'
HOSTILE_SHADOW = "<script>window.__pwned=2</script>Hi there & welcome"
HOSTILE_INPUTS = '{"prompt": "Greet the user </pre><svg onload=window.__pwned=3>"}'
LABEL = "A plain greeting: Hello, welcome!"
# How long a new key may take to reach the review service (the key
# directory's watch), and the page's own waits.
KEY_WAIT_S = 60.0
PAGE_WAIT_MS = 30_000


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("Debian's chromium is missing: run scripts/setup-browser.sh")
    return path


async def create_key(keys, name: str, scope: int) -> keys_rpc.CreateKeyResponse:
    return await keys.CreateKey(
        keys_rpc.CreateKeyRequest(
            key=gateway_pb2.Key(display_name=name, scopes=gateway_pb2.KeyScopes(services=[scope]))
        )
    )


async def once_the_key_works(call, request):
    """The call's answer, retried while the new key has not reached the
    review service yet (UNAUTHENTICATED)."""
    deadline = time.monotonic() + KEY_WAIT_S
    while True:
        try:
            return await call(request)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAUTHENTICATED or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.5)


def hostile_item(model: str) -> review_pb2.Item:
    return review_pb2.Item(
        source=review_pb2.ITEM_SOURCE_SHADOW_DISAGREEMENT,
        source_id=f"req-{model}",
        model=model,
        model_version="3",
        alternative_model=f"{model}-b",
        alternative_version="1",
        inputs=HOSTILE_INPUTS,
        primary_output=HOSTILE_PRIMARY,
        alternative_output=HOSTILE_SHADOW,
        context={"diff": "0.42", "note": "<i>not italic</i>"},
        request_id=f"req-{model}",
    )


def benign_items(model: str) -> list[review_pb2.Item]:
    """Company for it in the queue (left undecided)."""
    return [
        review_pb2.Item(
            source=review_pb2.ITEM_SOURCE_LOW_CONFIDENCE,
            source_id=f"low-{n}-{model}",
            model=model,
            model_version="3",
            inputs=f'{{"prompt": "question {n}"}}',
            primary_output=f"answer {n}",
            alternative_output=f"runner-up {n}",
            context={"confidence": "0.41"},
        )
        for n in (1, 2)
    ]


async def use_key(page: Page, secret: str) -> None:
    await page.fill("#key-input", secret)
    await page.press("#key-input", "Enter")


async def test_a_reviewer_decides_a_hostile_item_on_the_page(full_mesh, tmp_path):
    model = f"page-{uuid.uuid4().hex[:10]}"
    async with mesh_channel(full_mesh.address, full_mesh.api_key) as channel:
        keys = key_service_pb2_grpc.KeyServiceStub(channel)
        reviewer = await create_key(keys, "page reviewer", gateway_pb2.PLATFORM_SERVICE_REVIEW)
        source = await create_key(
            keys, "page item source", gateway_pb2.PLATFORM_SERVICE_REVIEW_SUBMIT
        )
    async with mesh_channel(full_mesh.address, source.secret) as channel:
        submitted = await once_the_key_works(
            review_service_pb2_grpc.ReviewServiceStub(channel).SubmitItems,
            rpc.SubmitItemsRequest(items=[hostile_item(model), *benign_items(model)]),
        )
    item = submitted.items[0]
    assert item.state == review_pb2.ITEM_STATE_OPEN
    async with mesh_channel(full_mesh.address, reviewer.secret) as channel:
        review = review_service_pb2_grpc.ReviewServiceStub(channel)
        await once_the_key_works(review.ListItems, rpc.ListItemsRequest(model=model))

        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=chromium(), headless=True)
            try:
                page = await browser.new_page(viewport={"width": 1440, "height": 1000})
                problems: list[str] = []
                page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
                page.on(
                    "console",
                    lambda message: (
                        problems.append(f"console: {message.text}")
                        if message.type == "error"
                        else None
                    ),
                )
                await review_on_the_page(
                    page,
                    full_mesh.address,
                    item.name,
                    model,
                    source.secret,
                    reviewer.secret,
                    tmp_path,
                )
                # Nothing the item carried ran, and nothing failed.
                assert await page.evaluate("typeof window.__pwned") == "undefined"
                assert problems == []
                # The key is kept in the tab's sessionStorage, never in the URL.
                assert reviewer.secret not in page.url
                stored = await page.evaluate("sessionStorage.getItem('mlmesh.review.key')")
                assert stored == reviewer.secret
            finally:
                await browser.close()

        # The verdict is the service's record, made with the reviewer's key.
        decided = (await review.GetItem(rpc.GetItemRequest(name=item.name))).item
        assert decided.state == review_pb2.ITEM_STATE_DECIDED
        assert decided.verdict == review_pb2.VERDICT_BOTH_WRONG
        assert decided.correct_label == LABEL
        assert decided.reviewer_key_id == reviewer.key.id
        exported = await review.ExportDataset(rpc.ExportDatasetRequest(model=model))
    assert exported.item_count == 1  # the decided one alone
    async with mesh_channel(full_mesh.address, full_mesh.api_key) as channel:
        registry = registry_service_pb2_grpc.RegistryServiceStub(channel)
        _, data = await download(registry, ref(exported.dataset, version=exported.version))
    (row,) = pq.read_table(io.BytesIO(data)).to_pylist()
    assert row["item"] == item.name
    assert "BOTH_WRONG" in row["verdict"]
    assert row["correct_label"] == LABEL
    assert row["primary_output"] == HOSTILE_PRIMARY
    assert row["reviewer_key_id"] == reviewer.key.id


async def review_on_the_page(
    page: Page,
    address: str,
    name: str,
    model: str,
    wrong_secret: str,
    secret: str,
    tmp_path: Path,
) -> None:
    expect.set_options(timeout=PAGE_WAIT_MS)
    response = await page.goto(f"http://{address}/review/")
    assert response is not None and response.status == 200
    headers = await response.all_headers()
    assert "script-src 'self'" in headers["content-security-policy"]
    assert "default-src 'none'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"

    # A key without the REVIEW scope: the service refuses it, the page says so.
    await use_key(page, wrong_secret)
    await expect(page.locator("#error")).to_contain_text("PERMISSION_DENIED")
    await page.click("#forget-key")

    await use_key(page, secret)
    await expect(page.locator("#key-state")).to_have_text("Key set for this tab.")
    await page.fill("#filter-model", model)
    await page.click("#refresh")
    entry = page.locator(f"#queue-rows button[data-item='{name}']")
    await expect(entry).to_have_count(1)
    await expect(page.locator("#error")).to_be_hidden()
    await entry.click()

    # Side by side, every text exactly as sent: text, never markup.
    detail = page.locator("#detail")
    await expect(detail).to_be_visible()
    await expect(page.locator("#detail-name")).to_have_text(name)
    await expect(page.locator("#inputs")).to_have_text(HOSTILE_INPUTS)
    await expect(page.locator("#primary-output")).to_have_text(HOSTILE_PRIMARY)
    await expect(page.locator("#alternative-output")).to_have_text(HOSTILE_SHADOW)
    await expect(page.locator("#context-rows")).to_contain_text("<i>not italic</i>")
    for tag in ("img", "script", "svg", "b", "i"):
        await expect(detail.locator(tag)).to_have_count(0)

    await page.click("#claim")
    await expect(page.locator("#detail-state")).to_have_text("Claimed")
    # The whole queue of the model: the claimed item and the two still open.
    await page.select_option("#filter-state", "0")
    await expect(page.locator("#queue-rows tr")).to_have_count(3)
    await expect(page.locator("#queue-rows tr.selected")).to_contain_text("Claimed")
    await page.select_option("#verdict", str(review_pb2.VERDICT_BOTH_WRONG))
    await page.fill("#correct-label", LABEL)
    await page.fill("#note", "decided on the page")
    shot = await page.screenshot(full_page=True)
    (tmp_path / "review-page.png").write_bytes(shot)
    if os.environ.get("MLMESH_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.write_bytes(shot)

    await page.click("#submit-verdict")
    await expect(page.locator("#detail-state")).to_have_text("Decided")
    await expect(page.locator("#detail-facts")).to_contain_text(LABEL)
    await expect(page.locator("#error")).to_be_hidden()


async def test_the_page_serves_its_own_files_alone_under_a_strict_policy():
    """The review service's HTTP port (no mesh): the fixed files, each with
    the policy; nothing else, however the path is spelt; GET and HEAD only."""
    page = ReviewPage()
    port = await page.start("127.0.0.1", 0)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            bodies = {}
            for path, kind in (
                ("/review/", "text/html"),
                ("/review/index.html", "text/html"),
                ("/review/app.js", "text/javascript"),
                ("/review/style.css", "text/css"),
            ):
                async with http.get(base + path) as reply:
                    assert reply.status == 200, path
                    assert reply.headers["content-type"].startswith(kind)
                    assert reply.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
                    assert reply.headers["x-content-type-options"] == "nosniff"
                    assert reply.headers["x-frame-options"] == "DENY"
                    bodies[path] = await reply.text()
            # The DOM is built from text alone: no HTML sink in the script.
            for sink in ("innerHTML =", "outerHTML", "insertAdjacentHTML", "document.write"):
                assert sink not in bodies["/review/app.js"]
            for policy in ("default-src 'none'", "script-src 'self'", "trusted-types 'none'"):
                assert policy in CONTENT_SECURITY_POLICY
            assert "unsafe" not in CONTENT_SECURITY_POLICY
            for path in (
                "/review/web.py",
                "/review/../mlmesh_review/web.py",
                "/review/%2e%2e/web.py",
                "/review/static/app.js",
                "/review",
                "/",
            ):
                async with http.get(base + path) as reply:
                    assert reply.status == 404, path
            async with http.post(base + "/review/app.js", data=b"x") as reply:
                assert reply.status == 405
            async with http.get(base + "/healthz") as reply:
                assert reply.status == 200
    finally:
        await page.close()
    assert not page.serving


# ---- the page's protobuf and gRPC-Web codec, against Python's protobuf --------


def grpc_web_body(message: bytes | None, trailers: dict[str, str]) -> bytes:
    body = b"" if message is None else b"\x00" + struct.pack(">I", len(message)) + message
    block = "".join(f"{k}:{v}\r\n" for k, v in trailers.items()).encode()
    return body + b"\x80" + struct.pack(">I", len(block)) + block


def full_item(name: str) -> review_pb2.Item:
    item = hostile_item("codec-model")
    item.name = name
    item.inputs = "ünïcödé ✓ 😀 " + "x" * 15000  # multi-byte text, a two-byte length
    item.state = review_pb2.ITEM_STATE_CLAIMED
    item.claim_holder = "k-holder"
    item.claim_expire_time.FromSeconds(4_102_444_800)  # 2100-01-01: a five-byte varint
    item.create_time.FromSeconds(1_700_000_000)
    item.submitter_key_id = "k-source"
    item.escalation_reason = "<b>look</b>"
    item.context["score"] = "0.5"
    return item


async def test_the_page_codec_matches_protobuf_and_shows_errors(tmp_path):
    """The page's hand-written codec against Python's protobuf, without the
    mesh: the browser's requests are read by the generated classes, answers
    built by them are shown exactly, and a failure's google.rpc details reach
    the reviewer."""
    page_server = ReviewPage()
    port = await page_server.start("127.0.0.1", 0)
    seen: dict[str, bytes] = {}
    keys: list[str] = []

    async def answer(route: Route) -> None:
        request = route.request
        method = request.url.rsplit("/", 1)[1]
        body = request.post_data_buffer or b""
        assert body[0] == 0 and struct.unpack(">I", body[1:5])[0] == len(body) - 5
        seen[method] = body[5:]
        keys.append(request.headers.get("authorization", ""))
        assert request.headers["content-type"] == "application/grpc-web+proto"
        ok = {"grpc-status": "0", "grpc-message": ""}
        if method == "ListItems":
            listed = rpc.ListItemsResponse(
                items=[full_item("items/one"), full_item("items/two")], next_page_token="tok/2"
            )
            await route.fulfill(
                status=200,
                headers={"content-type": "application/grpc-web+proto"},
                body=grpc_web_body(listed.SerializeToString(), ok),
            )
        elif method == "GetItem":
            got = rpc.GetItemResponse(item=full_item("items/one"))
            await route.fulfill(
                status=200,
                headers={"content-type": "application/grpc-web+proto"},
                body=grpc_web_body(got.SerializeToString(), ok),
            )
        else:  # ClaimItem: refused, with rich details (a trailers-only answer)
            status = status_pb2.Status(code=9, message="held by k-holder <until later>")
            status.details.add().Pack(
                error_details_pb2.ErrorInfo(reason="ITEM_CLAIMED", domain="mlmesh.review")
            )
            status.details.add().Pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field="name", description="<i>is held</i>"
                        )
                    ]
                )
            )
            details = base64.b64encode(status.SerializeToString()).decode().rstrip("=")
            await route.fulfill(
                status=200,
                headers={
                    "content-type": "application/grpc-web+proto",
                    "grpc-status": "9",
                    "grpc-message": "held%20by%20k-holder",
                    "grpc-status-details-bin": details,
                },
                body=b"",
            )

    try:
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=chromium(), headless=True)
            try:
                page = await browser.new_page()
                await page.route("**/mlmesh.review.v1.ReviewService/*", answer)
                expect.set_options(timeout=PAGE_WAIT_MS)
                await page.goto(f"http://127.0.0.1:{port}/review/")
                await use_key(page, "mlm_codec_secret")
                await expect(page.locator("#queue-rows tr")).to_have_count(2)
                async with page.expect_response("**/ListItems"):
                    await page.select_option("#page-size", "10")
                request = rpc.ListItemsRequest.FromString(seen["ListItems"])
                assert request == rpc.ListItemsRequest(
                    state=review_pb2.ITEM_STATE_OPEN, page_size=10
                )
                await expect(page.locator("#next-page")).to_be_enabled()
                async with page.expect_response("**/ListItems"):
                    await page.click("#next-page")
                await expect(page.locator("#page-label")).to_have_text("Page 2")
                request = rpc.ListItemsRequest.FromString(seen["ListItems"])
                assert request.page_token == "tok/2"

                async with page.expect_response("**/GetItem"):
                    await page.click("#queue-rows button[data-item='items/one']")
                assert rpc.GetItemRequest.FromString(seen["GetItem"]).name == "items/one"
                item = full_item("items/one")
                await expect(page.locator("#inputs")).to_have_text(item.inputs)
                await expect(page.locator("#primary-output")).to_have_text(HOSTILE_PRIMARY)
                await expect(page.locator("#alternative-output")).to_have_text(HOSTILE_SHADOW)
                await expect(page.locator("#detail-state")).to_have_text("Claimed")
                facts = page.locator("#detail-facts")
                await expect(facts).to_contain_text("2100-01-01 00:00:00 UTC")
                await expect(facts).to_contain_text("2023-11-14 22:13:20 UTC")
                await expect(facts).to_contain_text("<b>look</b>")
                await expect(page.locator("#context-rows tr")).to_have_count(3)

                async with page.expect_response("**/ClaimItem"):
                    await page.click("#claim")
                assert rpc.ClaimItemRequest.FromString(seen["ClaimItem"]).name == "items/one"
                error = page.locator("#error")
                await expect(error).to_contain_text("FAILED_PRECONDITION")
                await expect(error).to_contain_text("held by k-holder <until later>")
                await expect(error).to_contain_text("(ITEM_CLAIMED)")
                await expect(error.locator("li")).to_have_text("name <i>is held</i>")
                assert await page.evaluate("typeof window.__pwned") == "undefined"
                assert set(keys) == {"Bearer mlm_codec_secret"}
                await page.screenshot(path=str(tmp_path / "codec.png"), full_page=True)
            finally:
                await browser.close()
    finally:
        await page_server.close()
