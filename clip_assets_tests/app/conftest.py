"""The app on a real uvicorn server: a loopback port the system picked, the real tiny model, real
DuckDB files and thumbnails in temp dirs."""

import pytest

from clip_assets.app.app import running_app


@pytest.fixture
def app(settings, classified, clip, tmp_path):
    """The running app (clip_assets.app.app.RunningApp) over the classified two-batch collection."""
    with running_app(settings, clip=clip, thumbs_dir=tmp_path / "thumbs") as running:
        yield running


@pytest.fixture
def server(app) -> str:
    """The app's URL, e.g. http://127.0.0.1:40123."""
    return app.url
