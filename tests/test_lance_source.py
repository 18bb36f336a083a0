"""One rule for what a model source string names: tiny checkpoint, fsspec URI, hub repo id, local dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from lance_ray.models.lance.checkpoint import resolve_checkpoint
from lance_ray.models.lance.source import default_cache_dir, parse_tiny, source_kind


@pytest.mark.parametrize(
    ("source", "kind"),
    [
        ("lance-tiny", "tiny"),
        ("lance-tiny:0", "tiny"),
        ("lance-tiny:123", "tiny"),
        ("lance-tiny:", "local"),
        ("lance-tiny:x", "local"),
        ("lance-tiny:-1", "local"),
        ("s3://bucket/lance", "uri"),
        ("gs://bucket/a/b/c", "uri"),
        ("file:///models/lance", "uri"),
        ("bytedance-research/Lance", "hub"),
        ("owner/name.v2", "hub"),
        ("Org_1/model-3B", "hub"),
        ("./owner/name", "local"),
        ("../lance", "local"),
        ("/models/lance", "local"),
        ("~/lance", "local"),
        ("~owner/name", "local"),
        (".owner/name", "local"),
        ("owner/.name", "local"),
        ("owner/name.", "local"),
        ("-owner/name", "local"),
        ("owner--x/name", "local"),
        ("owner/na..me", "local"),
        ("owner/" + "n" * 100, "local"),
        ("checkpoints/lance/v1", "local"),
        ("lance", "local"),
        ("owner/name/", "local"),
    ],
)
def test_source_kind(source: str, kind: str) -> None:
    assert source_kind(source) == kind


def test_parse_tiny() -> None:
    assert parse_tiny("lance-tiny") == 0
    assert parse_tiny("lance-tiny:7") == 7
    assert parse_tiny("lance-tiny:x") is None
    assert parse_tiny("bytedance-research/Lance") is None


def test_default_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LANCE_RAY_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("LANCE_RAY_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "lance-ray"


def test_resolve_follows_the_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A seed that is not an integer is no tiny source but a (missing) local directory.
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        resolve_checkpoint("lance-tiny:x", "image", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        resolve_checkpoint(str(tmp_path / "a" / "b" / "c"), "image", cache_dir=tmp_path)
    # `owner/name` goes to the hub even when such a relative directory exists.
    import huggingface_hub

    def fake_snapshot_download(repo_id, **_):
        raise RuntimeError(f"hub: {repo_id}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "name").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="hub: owner/name"):
        resolve_checkpoint("owner/name", "image", cache_dir=tmp_path)
