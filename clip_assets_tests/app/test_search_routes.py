"""The search page of the app: a real uvicorn server on a free loopback port, the real tiny model,
real HTTP requests (multipart uploads included, and raw ones no library would send)."""

import io
import re
import time
from urllib.parse import urlencode

import pytest
from PIL import Image

from clip_assets.app.app import running_app
from clip_assets.app.files import REVIEW_THUMBNAIL_PX, SEARCH_THUMBNAIL_PX
from clip_assets.app.uploads import MAX_UPLOAD_BYTES
from clip_assets.search.query import search
from clip_assets_tests.support.chromium import CHROMIUM, chromium_dump_dom
from clip_assets_tests.support.http_requests import get, multipart_body, post_multipart, raw_request


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


def test_every_page_has_the_same_navigation(server):
    for path in ["/", "/gallery", "/duplicates", "/review"]:
        status, _, body = get(server + path)
        nav = re.search(r"<nav>(.*?)</nav>", body.decode(), re.DOTALL)
        assert status in (200, 404) and nav, path
        assert re.findall(r'href="([^"]+)"', nav[1]) == ["/", "/gallery", "/duplicates", "/review"]
        assert nav[1].count('aria-current="page"') == 1


def test_thumbnails_are_small_jpegs_of_files_under_the_image_root_only(server, settings, tmp_path):
    some = min(p.relative_to(settings.image_root).as_posix() for p in settings.image_root.glob("batch-001/*.png"))
    for size in (None, REVIEW_THUMBNAIL_PX):
        status, content_type, body = get(
            f"{server}/thumb?" + urlencode({"path": some, **({"size": size} if size else {})})
        )
        assert status == 200 and content_type == "image/jpeg"
        with Image.open(io.BytesIO(body)) as thumb:
            assert thumb.format == "JPEG" and max(thumb.size) <= (size or SEARCH_THUMBNAIL_PX)
    assert get(f"{server}/thumb?" + urlencode({"path": some, "size": 5000}))[0] == 400  # no full-size copies
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    for path in [
        "../" * 12 + str(outside).lstrip("/"),
        str(outside),
        f"batch-001/../../{outside.name}",
        "batch-001",
        "batch-002/broken-empty.jpg",
        "batch-002/notes-not-an-image.png",
        "no-such.png",
        "a\x00b",
    ]:
        status, _, body = get(f"{server}/thumb?" + urlencode({"path": path}))
        assert status == 404, path


def test_a_traversal_in_the_raw_request_line_is_not_served(server, tmp_path):
    """Paths a browser would normalise, sent as they are: the app serves only its routes and static files."""
    for target in [
        "/static/../../../../etc/passwd",
        "/static/%2e%2e/%2e%2e/app.py",
        "/thumb?path=../../../etc/passwd",
        "/../../etc/passwd",
    ]:
        answer = raw_request(server, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        status = int(answer.split(b" ", 2)[1])
        assert status in (400, 404) and b"root:" not in answer and b"import" not in answer, target


def test_a_symlink_out_of_the_image_root_is_not_served(settings, classified, clip, tmp_path):
    root = tmp_path / "root"
    (root / "b").mkdir(parents=True)
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8), (200, 0, 0)).save(outside)
    (root / "b" / "link.png").symlink_to(outside)
    Image.new("RGB", (8, 8), (0, 200, 0)).save(root / "b" / "inside.png")
    (root / "b" / "loop.png").symlink_to(root / "b" / "loop.png")
    with running_app(settings.model_copy(update={"image_root": root}), clip=clip, thumbs_dir=tmp_path / "t") as app:
        assert get(f"{app.url}/thumb?path=b/inside.png")[0] == 200
        assert get(f"{app.url}/thumb?path=b/link.png")[0] == 404
        status, _, body = get(f"{app.url}/thumb?path=b/loop.png")  # a loop of links: a 404, not a dropped connection
        assert status == 404 and b"no such image" in body
        assert get(f"{app.url}/?image=b/loop.png")[0] == 400


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


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def test_an_upload_over_the_limit_is_refused_before_its_body_is_sent(server):
    """The headers alone: a declared size over the limit, or no size (chunked), gets its answer at once
    and the connection closed, with not one byte of the body sent."""
    started = time.monotonic()
    head = (
        f"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        f"Content-Length: {MAX_UPLOAD_BYTES + 1}\r\n\r\n"
    ).encode()
    answer = raw_request(server, head)
    assert status_of(answer) == 413 and b"limited to 32 MiB" in answer
    chunked = (
        b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    answer = raw_request(server, chunked)
    assert status_of(answer) == 411 and b"Content-Length" in answer
    assert time.monotonic() - started < 5  # answered, not waited out: raw_request reads until the server closes


def test_an_upload_longer_than_it_says_is_read_only_as_far_as_it_says(server, settings):
    """A Content-Length under the limit on a body that goes on: the server reads what was declared,
    answers, and never waits for the rest (the rest is never sent)."""
    picture = min(settings.image_root.glob("batch-002/*.png")).read_bytes()
    body, content_type = multipart_body({"k": "3"}, "image", "big.png", picture + b"\0" * 4_000_000)
    declared = 600  # a cut through the file part
    head = (
        f"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nConnection: close\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    ).encode()
    answer = raw_request(server, head + body[:declared])
    assert status_of(answer) == 400 and b'class="error"' in answer


def test_a_malformed_upload_is_explained(server):
    head = (
        b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nConnection: close\r\n"
        b"Content-Length: 5\r\n\r\nhello"
    )
    answer = raw_request(server, head)
    assert status_of(answer) == 400 and b"multipart/form-data" in answer
    head = (
        b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Connection: close\r\nContent-Length: nine\r\n\r\n"
    )
    assert status_of(raw_request(server, head)) == 400


def test_the_page_escapes_what_it_shows(server):
    status, _, body = get(f"{server}/?" + urlencode({"q": '<script>alert("x")</script>', "k": 2}))
    page = body.decode()
    assert status == 200
    assert "<script>alert" not in page and "&lt;script&gt;alert(&#34;x&#34;)" in page


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"q": "a red circle", "k": "0"}, "k must be from 1"),
        ({"q": "a red circle", "k": "lots"}, "k must be a whole number"),
        ({"q": "a red circle", "category": "no-such-category"}, "known categories"),
        ({"image": "../outside.png"}, "No image file"),
    ],
)
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


def test_a_damaged_batch_is_left_out_with_a_warning_and_the_others_searched(server, settings, classified):
    """An embeddings file that is not parquet any more: the page names it, with the command that
    rebuilds it, and shows the other batch's hits."""
    damaged = classified.embeddings_dir / "batch-001.parquet"
    damaged.write_bytes(b"not parquet")
    status, _, body = get(f"{server}/?" + urlencode({"q": "a red circle", "k": 3}))
    page = body.decode()
    assert status == 200 and "Traceback" not in page
    warning = re.search(r'class="warning"[^>]*>(.*?)</p>', page, re.DOTALL)[1]
    assert str(damaged) in warning and "--partition batch-001" in warning
    assert [p.split("/")[0] for p, _ in shown(page)] == ["batch-002"] * 3


def test_a_search_with_no_embeddings_is_a_message(settings, clip, tmp_path):
    with running_app(settings, clip=clip, thumbs_dir=tmp_path / "t") as app:
        status, _, body = get(f"{app.url}/?q=a+red+circle")
    assert status == 400 and "materialize image_embeddings first" in body.decode()


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_the_results_page_loads_with_its_thumbnails_in_chromium(server, tmp_path):
    dom = chromium_dump_dom(f"{server}/?" + urlencode({"q": "a red circle", "k": 6}), tmp_path)
    total = int(re.search(r'data-images-total="(\d+)"', dom)[1])
    loaded = int(re.search(r'data-images-loaded="(\d+)"', dom)[1])
    assert total == 6 and loaded == total
    assert len(shown(dom)) == 6
