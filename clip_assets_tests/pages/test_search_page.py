"""The search page (`clip-assets serve`): a real server on a free loopback port, the real tiny model,
real HTTP requests (a multipart upload included), and the results page opened in headless Chromium."""

import io
import re
import threading
import urllib.error
import urllib.request
import uuid
from urllib.parse import urlencode

import pytest
from PIL import Image

from clip_assets.pages.search_page import THUMBNAIL_PX, start_server
from clip_assets.search.query import search
from clip_assets_tests.support.chromium import CHROMIUM, chromium_dump_dom


@pytest.fixture
def server(settings, classified, clip, tmp_path):
    """The search page on 127.0.0.1 and a port the system picked; its URL."""
    httpd = start_server(settings, "127.0.0.1", 0, clip=clip, thumbs_dir=tmp_path / "thumbs")
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    host, port = httpd.server_address[:2]
    yield f"http://{host}:{port}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(10)


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def post_multipart(url: str, fields: dict[str, str], file_field: str, file_name: str, data: bytes) -> tuple[int, str]:
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for name, value in fields.items():
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="{file_name}"\r\n'
               "Content-Type: application/octet-stream\r\n\r\n".encode())
    body.write(data + f"\r\n--{boundary}--\r\n".encode())
    request = urllib.request.Request(url, data=body.getvalue(), method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def shown(page: str) -> list[tuple[str, float]]:
    """(path, score) of each result card, in page order."""
    return [(path, float(score)) for score, path in re.findall(r'data-score="([^"]+)" data-path="([^"]+)"', page)]


def test_a_text_query_in_the_url_lists_the_same_hits_as_search(server, settings, clip):
    status, content_type, body = get(f"{server}/?" + urlencode({"q": "a red circle", "k": 5}))
    assert status == 200 and content_type.startswith("text/html")
    page = body.decode()
    expected = search(settings, text="a red circle", k=5, clip=clip)
    assert [p for p, _ in shown(page)] == [h.path for h in expected]
    assert [s for _, s in shown(page)] == pytest.approx([h.score for h in expected], abs=1e-5)
    assert 'data-hits="5"' in page and page.count('src="/thumb?path=') == 5


def test_thumbnails_are_small_jpegs_of_files_under_the_image_root_only(server, settings, tmp_path):
    some = sorted(p.relative_to(settings.image_root).as_posix() for p in settings.image_root.glob("batch-001/*.png"))[0]
    status, content_type, body = get(f"{server}/thumb?" + urlencode({"path": some}))
    assert status == 200 and content_type == "image/jpeg"
    with Image.open(io.BytesIO(body)) as thumb:
        assert thumb.format == "JPEG" and max(thumb.size) <= THUMBNAIL_PX
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    for path in ["../" * 12 + str(outside).lstrip("/"), str(outside), f"batch-001/../../{outside.name}",
                 "batch-001", "batch-002/broken-empty.jpg", "batch-002/notes-not-an-image.png", "no-such.png", "a\x00b"]:
        status, _, body = get(f"{server}/thumb?" + urlencode({"path": path}))
        assert status == 404, path


def test_a_symlink_out_of_the_image_root_is_not_served(settings, clip, tmp_path):
    root = tmp_path / "root"
    (root / "b").mkdir(parents=True)
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8), (200, 0, 0)).save(outside)
    (root / "b" / "link.png").symlink_to(outside)
    Image.new("RGB", (8, 8), (0, 200, 0)).save(root / "b" / "inside.png")
    httpd = start_server(settings.model_copy(update={"image_root": root}), "127.0.0.1", 0, clip=clip,
                         thumbs_dir=tmp_path / "thumbs")
    page = httpd.search_page
    httpd.server_close()
    assert page.thumbnail("b/inside.png") is not None
    assert page.thumbnail("b/link.png") is None


def test_a_symlink_loop_is_not_served_and_does_not_break_the_request(settings, clip, tmp_path):
    root = tmp_path / "root"
    (root / "b").mkdir(parents=True)
    (root / "b" / "loop.png").symlink_to(root / "b" / "loop.png")
    httpd = start_server(settings.model_copy(update={"image_root": root}), "127.0.0.1", 0, clip=clip,
                         thumbs_dir=tmp_path / "thumbs")
    page = httpd.search_page
    httpd.server_close()
    assert page.file_under_root("b/loop.png") is None and page.thumbnail("b/loop.png") is None


def test_an_uploaded_image_finds_itself_first(server, settings):
    some = sorted(settings.image_root.glob("batch-002/*.png"))[2]
    status, page = post_multipart(f"{server}/search", {"k": "3"}, "image", "my photo.png", some.read_bytes())
    assert status == 200, page
    hits = shown(page)
    assert len(hits) == 3
    assert hits[0][0] == some.relative_to(settings.image_root).as_posix() and hits[0][1] == pytest.approx(1.0, abs=1e-4)
    assert 'src="data:image/jpeg;base64,' in page and "my photo.png" in page  # the query, shown back


def test_an_upload_that_is_not_an_image_is_explained(server):
    status, page = post_multipart(f"{server}/search", {"k": "3"}, "image", "notes.txt", b"hello, not a picture")
    assert status == 400
    assert 'class="error"' in page and "notes.txt is not an image file" in page and "data-hits" not in page


def test_the_page_escapes_what_it_shows(server):
    status, _, body = get(f"{server}/?" + urlencode({"q": '<script>alert("x")</script>', "k": 2}))
    page = body.decode()
    assert status == 200
    assert "<script>alert" not in page and "&lt;script&gt;alert(&quot;x&quot;)" in page


@pytest.mark.parametrize(("query", "message"), [
    ({"q": "a red circle", "k": "0"}, "k must be from 1"),
    ({"q": "a red circle", "k": "lots"}, "k must be a whole number"),
    ({"q": "a red circle", "category": "no-such-category"}, "known categories"),
    ({"image": "../outside.png"}, "No image file"),
])
def test_mistakes_are_shown_on_the_page(server, query, message):
    status, _, body = get(f"{server}/?" + urlencode(query))
    assert status == 400 and message in body.decode()


def test_more_like_this_searches_by_a_stored_image(server, settings, clip):
    status, _, body = get(f"{server}/?" + urlencode({"q": "a blue square", "k": 1}))
    first = shown(body.decode())[0][0]
    assert f'href="/?{urlencode({"image": first})}"' in body.decode().replace("&amp;", "&")
    status, _, body = get(f"{server}/?" + urlencode({"image": first, "k": 3}))
    assert status == 200
    expected = search(settings, image=settings.image_root / first, k=3, clip=clip)
    assert [p for p, _ in shown(body.decode())] == [h.path for h in expected]
    assert f'class="query" src="/thumb?path={first}"' in body.decode()  # the query image, shown back


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_the_results_page_loads_with_its_thumbnails_in_chromium(server, tmp_path):
    dom = chromium_dump_dom(f"{server}/?" + urlencode({"q": "a red circle", "k": 6}), tmp_path)
    total = int(re.search(r'data-images-total="(\d+)"', dom)[1])
    loaded = int(re.search(r'data-images-loaded="(\d+)"', dom)[1])
    assert total == 6 and loaded == total
    assert len(shown(dom)) == 6
