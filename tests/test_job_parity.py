"""The job path (spec -> sources -> worker -> pipeline -> sinks) against the official goldens, and real media.

1. Every number is reachable from a job file: float32 jobs on the tiny checkpoint (golden LLM/ViT weights, small
   VAE) with the golden settings give the official x2t answers, and t2i/t2v media equal to decoding the official
   final latents with the same small VAE (the job's output holds no latents; the VAE has its own goldens).
   Under `seed_mode: official`, i2v / image_edit / video_edit (and t2i with seed 0, and captions) give the official
   pixels (texts) of runs of the official code itself on the same checkpoint (tests/fixtures/golden/official_runs/).
2. Real media files (EXIF-rotated JPEG, RGBA PNG, grayscale JPEG, odd-length 25 fps MP4, display-rotated MP4, a
   corrupt file) through image_edit / video_edit jobs, and a multi-turn edit chained into a caption step.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import av
import numpy as np
import official_runs
import pytest
from PIL import Image, ImageOps
from safetensors.torch import load_file

from lance_ray.io import media
from lance_ray.models.lance import preprocess
from lance_ray.models.lance.pipeline import LancePipeline
from lance_ray.models.lance.vae import load_vae
from lance_ray.pipeline.runner import run_job
from lance_ray.pipeline.sinks import read_step_output
from lance_ray.spec import load_job_text

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
INPUTS = GOLDEN / "inputs"


def _run(tmp_path: Path, tiny_ckpt: Path, steps: list[dict]) -> dict[str, dict[str, dict]]:
    """Runs a float32 CPU job (JSON is YAML) and returns {step: {row_id: output row}}."""
    model = {"source": str(tiny_ckpt), "precision": "float32", "device": "cpu"}
    spec = {"name": "parity", "models": {"image": model, "video": model}, "output": str(tmp_path / "out"),
            "steps": steps}
    job = load_job_text(json.dumps(spec, indent=1), "parity.yaml", tmp_path)
    run_job(job, progress=False)
    return {s["name"]: {r["row_id"]: r for r in read_step_output(str(tmp_path / "out" / s["name"])).to_pylist()}
            for s in steps}


def _x2t_golden(task: str) -> tuple[dict, str, str]:
    meta = json.loads((GOLDEN / "fp32_kv" / task / "x2t_meta.json").read_text())
    system, question, _ = next(iter(meta["input"].values()))["interleave_array"][1]
    return meta, system, question


def _decode_golden_latent(tiny_ckpt: Path, task: str) -> np.ndarray:
    """uint8 [T, H, W, 3] from the official final latent, decoded by the checkpoint's own (small) VAE."""
    latent = load_file(GOLDEN / "fp32_kv" / task / "generation.safetensors")["final_latent_target"]  # [t, h, w, 48]
    vae = load_vae(tiny_ckpt / "Wan2.2_VAE.pth")
    return vae.decode_uint8(latent.permute(3, 0, 1, 2)[None])[0].numpy()


def _assert_within_one_lsb(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    diff = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.999, (diff.max(), (diff > 0).mean())
    assert expected.std() > 5  # not a flat image, where any latent would pass


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_job_reproduces_official_outputs(tmp_path: Path, tiny_ckpt: Path) -> None:
    steps = []
    for task, preset, medium in (("x2t_image", "image_256res", ("image", "img_304x224.png")),
                                 ("x2t_video", "video_192p", ("video", "vid_304x224_5f12.mp4"))):
        _, system, question = _x2t_golden(task)
        steps.append({"name": task.replace("_", "-"), "task": task,
                      "input": {"rows": [{medium[0]: str(INPUTS / medium[1]), "prompt": question}]},
                      "params": {"preset": preset, "max_new_tokens": 24, "system_prompt": system}})
    generation = json.loads((GOLDEN / "fp32_kv" / "t2i" / "generation_meta.json").read_text())
    sampler = generation["sampler"]
    official = {"steps": sampler["num_timesteps"], "shift": sampler["timestep_shift"],
                "cfg_scale": sampler["cfg_text_scale"], "cfg_interval": sampler["cfg_interval"],
                "cfg_renorm_min": float(sampler["cfg_renorm_min"]), "seed": sampler["validation_noise_seed"],
                "seed_mode": "official"}
    for task in ("t2i", "t2v"):
        meta = json.loads((GOLDEN / "fp32_kv" / task / "generation_meta.json").read_text())
        assert meta["sampler"] == sampler  # one set of sampling settings for both
        size = {"height": meta["video_height"], "width": meta["video_width"]}
        if task == "t2v":
            size["frames"] = meta["num_frames"]
        steps.append({"name": task, "task": task, "input": {"rows": [{"prompt": meta["prompt"]}]},
                      "params": {"preset": meta["resolution"], **size, **official},
                      "output": {"video_codec": "ffv1"}})  # lossless, so pixels can be compared
    out = _run(tmp_path, tiny_ckpt, steps)

    for task in ("x2t_image", "x2t_video"):
        meta, _, _ = _x2t_golden(task)
        (row,) = out[task.replace("_", "-")].values()
        assert row["error"] is None
        # The official answer, after its own normalisation (strip, drop <|im_end|>).
        assert row["text"] == meta["generated_text_normalized"] == meta["generated_text"].strip()

    (t2i,) = out["t2i"].values()
    assert t2i["error"] is None and t2i["seed"] == 42
    _assert_within_one_lsb(media.decode_image(t2i["media_uri"]), _decode_golden_latent(tiny_ckpt, "t2i")[0])
    (t2v,) = out["t2v"].values()
    assert t2v["error"] is None and t2v["media_uri"].endswith(".mkv")
    _assert_within_one_lsb(media.decode_video(t2v["media_uri"]), _decode_golden_latent(tiny_ckpt, "t2v"))


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_official_mode_jobs_reproduce_official_runs(tmp_path: Path, tiny_ckpt: Path) -> None:
    """Each row of a `seed_mode: official` step is reproduced as the official script run on that row: the first
    row of every official run in the fixtures (other seeds, non-square and non-bucket inputs, a drawn crop
    offset, 5 and 9 frames, CFG 4 and 1, seed 0, captions), through a job file, compared pixel by pixel (and
    the captions' text). The image steps hold that row twice in one batch: each copy is its own run, so both
    are the official first row (one run over both would give the second one the run's second draws)."""
    runs = [official_runs.load(name) for name in official_runs.NAMES]
    steps = []
    for run in runs:
        first = run.rows[0]
        row = {} if first.prompt is None else {"prompt": first.prompt}  # no prompt: a caption
        if first.media is not None:
            row["video" if first.media.endswith(".mp4") else "image"] = str(official_runs.input_path(first.media))
        copies = 2 if run.settings["family"] == "image" else 1
        steps.append({"name": run.name.replace("_", "-"), "task": run.settings["task"],
                      "input": {"rows": [row] * copies}, "params": run.params, "resources": {"batch_size": 2},
                      "output": {"video_codec": "ffv1"}})  # lossless: pixels compare
    out = _run(tmp_path, tiny_ckpt, steps)
    for run in runs:
        rows = list(out[run.name.replace("_", "-")].values())
        assert len(rows) == (2 if run.settings["family"] == "image" else 1)
        for row in rows:
            assert row["error"] is None and row["seed"] == run.settings["seed"]
            assert json.loads(row["params"])["seed_mode"] == "official"
            if run.rows[0].pixels is None:  # a caption: the instruction of the run's first pick, the official answer
                assert row["text"] == run.rows[0].meta["generated_text"]
                continue
            uri = row["media_uri"]
            pixels = media.decode_image(uri) if uri.endswith(".png") else media.decode_video(uri)
            official_runs.assert_official_pixels(run.rows[0].compare(pixels), run.rows[0].pixels, identical=0.999)


# ---------------------------------------------------------------------------------------------------------------
# Real media through edit jobs


def _pattern(height: int, width: int) -> np.ndarray:
    """A smooth colour pattern with a marker block in the stored top-left corner."""
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    img[: height // 4, : width // 4] = (255, 255, 255)
    return img.astype(np.uint8)


def _write_video(path: Path, frames: np.ndarray, fps: int, rotation: int = 0) -> None:
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        if rotation:
            stream.set_display_rotation(rotation)  # counter-clockwise degrees of the display matrix
        for pixels in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode(None))


def _media_files(root: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    root.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed turned 90 degrees clockwise: portrait
    images = {"exif6": root / "exif6.jpg", "alpha": root / "alpha.png", "gray": root / "gray.jpg",
              "corrupt": root / "corrupt.jpg"}
    Image.fromarray(_pattern(240, 320)).save(images["exif6"], quality=95, exif=exif.tobytes())
    rgba = np.dstack([_pattern(150, 200), np.where(np.arange(200) < 100, 0, 255).astype(np.uint8)[None].repeat(150, 0)])
    Image.fromarray(rgba, "RGBA").save(images["alpha"])
    Image.fromarray(_pattern(180, 320)[..., 0], "L").save(images["gray"], quality=95)
    buf = io.BytesIO()
    Image.fromarray(_pattern(64, 64)).save(buf, format="JPEG")
    images["corrupt"].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    clip = np.stack([np.roll(_pattern(96, 128), 4 * i, axis=1) for i in range(13)])
    videos = {"odd13": root / "odd13.mp4", "rot90": root / "rot90.mp4"}
    _write_video(videos["odd13"], clip, 25)
    _write_video(videos["rot90"], clip, 25, rotation=90)
    return images, videos


def _displayed_size(path: Path) -> tuple[int, int]:
    """(height, width) as a viewer shows the file, read independently of lance_ray.io.media."""
    if path.suffix == ".mp4":
        with av.open(str(path)) as container:
            frame = next(container.decode(video=0))
            turned = round(frame.rotation) % 180 == 90
            return (frame.width, frame.height) if turned else (frame.height, frame.width)
    with Image.open(path) as img:
        width, height = ImageOps.exif_transpose(img).size
    return height, width


@pytest.fixture(scope="module")
def edit_job(tmp_path_factory: pytest.TempPathFactory, tiny_ckpt: Path, ray_local: None) -> dict:
    """One job for the edit tests (actors start once): single edits of real files, and a 2-turn edit chained
    into a caption step."""
    root = tmp_path_factory.mktemp("edit-job")
    images, videos = _media_files(root / "media")
    source = root / "media" / "source.png"
    Image.fromarray(_pattern(150, 200)).save(source)
    out = _run(root, tiny_ckpt, [
        {"name": "edit-images", "task": "image_edit",
         "input": {"rows": [{"id": k, "image": str(p)} for k, p in images.items()], "columns": {"row_id": "id"},
                   "prompt": "Make it look like winter."},
         "params": {"preset": "image_256res", "steps": 2}},
        {"name": "edit-videos", "task": "video_edit",
         "input": {"rows": [{"id": k, "video": str(p)} for k, p in videos.items()], "columns": {"row_id": "id"},
                   "prompt": "Make it night."},
         "params": {"preset": "video_192p", "steps": 2}},
        {"name": "edit-turns", "task": "image_edit", "input": {"rows": [{"image": str(source)}]},
         "turns": ["Make the sky blue.", "Add a red hat."], "params": {"preset": "image_256res", "steps": 2}},
        {"name": "caption", "task": "x2t_image", "input": {"from_step": "edit-turns", "prompt": "Describe the image."},
         "params": {"preset": "image_256res", "max_new_tokens": 4}},
    ])
    return {"out": out, "images": images, "videos": videos, "source": source}


@pytest.mark.slow
def test_real_images_through_image_edit(edit_job: dict) -> None:
    images, edited = edit_job["images"], edit_job["out"]["edit-images"]
    assert set(edited) == set(images)
    assert "corrupt.jpg" in edited["corrupt"]["error"] and edited["corrupt"]["media_uri"] is None
    for name in ("exif6", "alpha", "gray"):
        row = edited[name]
        assert row["error"] is None, row["error"]
        expected = preprocess.bucket_size(*_displayed_size(images[name]), "image_256res", "vae")
        pixels = media.decode_image(row["media_uri"])
        assert pixels.shape == (*expected, 3) == (row["height"], row["width"], 3), name
    assert edited["exif6"]["height"] > edited["exif6"]["width"]  # displayed portrait, edited portrait


@pytest.mark.slow
def test_real_videos_through_video_edit(edit_job: dict) -> None:
    for name, path in edit_job["videos"].items():
        row = edit_job["out"]["edit-videos"][name]
        assert row["error"] is None, row["error"]
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            total, fps = stream.frames, float(stream.average_rate)
        n = len(preprocess.sample_frame_indices(total, fps))
        expected = (4 * ((n - 1) // 4) + 1, *preprocess.bucket_size(*_displayed_size(path), "video_192p", "vae"), 3)
        decoded = media.decode_video(row["media_uri"])
        assert (total, decoded.shape) == (13, expected), name
        assert (row["frames"], row["height"], row["width"]) == expected[:3]
    rotated = edit_job["out"]["edit-videos"]["rot90"]
    assert rotated["height"] > rotated["width"]  # stored landscape, displayed (and edited) portrait


@pytest.mark.slow
def test_multi_turn_edit_then_caption(edit_job: dict, tiny_ckpt: Path) -> None:
    (edit,) = edit_job["out"]["edit-turns"].values()
    assert edit["error"] is None
    turns = edit["turn_media_uris"]
    assert len(turns) == 2 and turns[-1] == edit["media_uri"] and turns[0] != turns[1]
    size = preprocess.bucket_size(150, 200, "image_256res", "vae")
    decoded = [media.decode_image(uri) for uri in turns]
    assert [d.shape for d in decoded] == [(*size, 3)] * 2
    assert not np.array_equal(decoded[0], decoded[1])  # the second turn edited the first turn's result
    (caption,) = edit_job["out"]["caption"].values()
    assert caption["error"] is None and caption["row_id"] == edit["row_id"]
    assert caption["image"] == edit["media_uri"] and caption["text"]
    # The caption is the model's answer about the last turn's picture, asked directly.
    pipe = LancePipeline.from_pretrained(str(tiny_ckpt), family="image", device="cpu", dtype="float32")
    direct = pipe.x2t_image([decoded[1]], ["Describe the image."], preset="image_256res", max_new_tokens=4)
    assert caption["text"] == direct[0]
