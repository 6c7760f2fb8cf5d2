"""ImageNet-P sequences and ImageNet-S systematic variants against the reference formulas and library calls."""
from __future__ import annotations

import io
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from qrobust.generate import imagecorruptions_compat
from qrobust.generate.sequences import PERTURBATIONS, affine, render_sequence
from qrobust.generate.systematic import DECODERS, RESIZES, render_systematic
from qrobust.shared.demo_data import photo
from qrobust.shared.preprocess import center_crop, resize_shorter
from qrobust.shared.video import decode_frames, encode_frames, recipe_for

SIZE, CROP = 256, 224


@pytest.fixture(scope="module")
def jpeg_bytes() -> dict[str, bytes]:
    """Real photos as non-square 4:2:0 JPEGs (where decoders differ by their chroma upsampling)."""
    out = {}
    for name in ("astronaut", "coffee"):
        buf = io.BytesIO()
        image = photo(name).convert("RGB")
        image.crop((0, 0, image.width, image.height * 3 // 4)).save(buf, format="JPEG", quality=90, subsampling=2)
        out[name] = buf.getvalue()
    return out


@pytest.fixture(scope="module")
def resized() -> Image.Image:
    return resize_shorter(photo("chelsea").convert("RGB"), 96)


def _square_pil(rgb: np.ndarray, method=Image.BILINEAR) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).resize((SIZE, SIZE), method))[16:240, 16:240]


# ---------------------------------------------------------------- systematic


def test_decoders_equal_the_direct_library_calls(jpeg_bytes):
    import av
    import cv2

    for data in jpeg_bytes.values():
        pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        np.testing.assert_array_equal(render_systematic(data, "pil", "pil-bilinear", SIZE, CROP), _square_pil(pil))
        ocv = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(render_systematic(data, "opencv", "pil-bilinear", SIZE, CROP), _square_pil(ocv))
        with av.open(io.BytesIO(data)) as c:
            ff = next(c.decode(video=0)).to_ndarray(format="rgb24", interpolation="BICUBIC")
        np.testing.assert_array_equal(render_systematic(data, "ffmpeg", "pil-bilinear", SIZE, CROP), _square_pil(ff))


def test_resizes_equal_the_direct_library_calls(jpeg_bytes):
    import cv2

    data = jpeg_bytes["coffee"]
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    pil = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "box": Image.BOX, "hamming": Image.HAMMING,
           "cubic": Image.BICUBIC, "lanczos": Image.LANCZOS}
    for name, method in pil.items():
        np.testing.assert_array_equal(render_systematic(data, "pil", f"pil-{name}", SIZE, CROP),
                                      _square_pil(rgb, method))
    ocv = {"bilinear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST, "area": cv2.INTER_AREA,
           "cubic": cv2.INTER_CUBIC, "lanczos": cv2.INTER_LANCZOS4}
    for name, flag in ocv.items():
        expected = cv2.resize(rgb, (SIZE, SIZE), interpolation=flag)[16:240, 16:240]
        np.testing.assert_array_equal(render_systematic(data, "pil", f"opencv-{name}", SIZE, CROP), expected)
    assert len(RESIZES) == 11 and len(DECODERS) == 3


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="the ffmpeg command line is not installed")
def test_ffmpeg_decoder_matches_the_command_line(jpeg_bytes, tmp_path):
    for name, data in jpeg_bytes.items():
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(data)
        raw = subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24",
                              "pipe:"], capture_output=True, check=True).stdout
        h, w = Image.open(path).size[::-1]
        cli = np.frombuffer(raw, np.uint8).reshape(h, w, 3)
        np.testing.assert_array_equal(DECODERS.get("ffmpeg")(data), cli)


def test_variants_differ_as_the_reference_reports(jpeg_bytes):
    for data in jpeg_bytes.values():
        base = render_systematic(data, "pil", "pil-bilinear", SIZE, CROP).astype(int)

        def dist(decoder, resize):
            return np.abs(render_systematic(data, decoder, resize, SIZE, CROP).astype(int) - base).mean()

        assert dist("opencv", "pil-bilinear") < 0.2  # same libjpeg-turbo
        assert dist("ffmpeg", "pil-bilinear") > 0.2  # swscale's chroma upsampling on 4:2:0
        near = max(dist("pil", r) for r in ("opencv-area", "pil-hamming", "pil-cubic"))
        far = min(dist("pil", r) for r in ("opencv-nearest", "pil-nearest"))
        assert 0 < near < far


# ---------------------------------------------------------------- sequences


def _crop(image: Image.Image, size: int = 80) -> np.ndarray:
    return np.asarray(center_crop(image, size))


def test_frame_counts_and_clean_frames(resized):
    clean = _crop(resized)
    for name in PERTURBATIONS:
        frames = render_sequence(resized, 80, name, 1, seed=5)
        assert frames.dtype == np.uint8 and frames.shape == ((41 if name == "translate" else 31), 80, 80, 3), name
        if name in ("gaussian_noise", "shot_noise", "zoom_blur"):
            np.testing.assert_array_equal(frames[0], clean)
        assert np.array_equal(frames, render_sequence(resized, 80, name, 1, seed=5)), name
    np.testing.assert_array_equal(render_sequence(resized, 80, "rotate", 1, 0)[15], clean)
    np.testing.assert_array_equal(render_sequence(resized, 80, "scale", 1, 0)[24], clean)
    np.testing.assert_array_equal(render_sequence(resized, 80, "translate", 1, 0)[20], clean)
    assert not np.array_equal(render_sequence(resized, 80, "snow", 1, 1), render_sequence(resized, 80, "snow", 1, 2))


def test_noise_frames_follow_the_formulas(resized):
    clean = _crop(resized)
    x32 = clean.astype(np.float32) / 255
    rng = np.random.default_rng(9)
    frames = render_sequence(resized, 80, "gaussian_noise", 2, seed=9)
    for i in range(1, 31):
        expected = (np.clip(x32 + np.float32(0.05) * rng.standard_normal(x32.shape, dtype=np.float32), 0, 1) * 255)
        np.testing.assert_array_equal(frames[i], expected.astype(np.uint8))
    rng = np.random.default_rng(4)
    frames = render_sequence(resized, 80, "shot_noise", 3, seed=4)
    for i in range(1, 31):
        expected = np.clip(rng.poisson(clean / 255.0 * 60) / 60, 0, 1) * 255
        np.testing.assert_array_equal(frames[i], expected.astype(np.uint8))


def test_photometric_frames_follow_the_formulas(resized):
    from skimage.color import hsv2rgb, rgb2hsv

    clean = _crop(resized)
    frames = render_sequence(resized, 80, "brightness", 1, 0)
    for i in (0, 7, 30):
        hsv = rgb2hsv(clean / 255.0)
        hsv[..., 2] = np.clip(hsv[..., 2] + (i - 15) * 0.02, 0, 1)
        np.testing.assert_array_equal(frames[i], (np.clip(hsv2rgb(hsv), 0, 1) * 255).astype(np.uint8))
    blur = imagecorruptions_compat.apply()._motion_blur
    frames = render_sequence(resized, 80, "motion_blur", 1, 0)
    for i in (0, 20):
        expected = np.clip(np.round(blur(clean, radius=10, sigma=3, angle=(i - 30) * 4)), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(frames[i], expected)


def test_geometric_frames_follow_the_formulas(resized):
    import cv2

    full = np.asarray(resized)
    frames = render_sequence(resized, 80, "translate", 1, 0)
    for dx in (-20, -3, 7, 20):
        shifted = np.zeros_like(full)
        if dx > 0:
            shifted[:, dx:] = full[:, :-dx]
        else:
            shifted[:, :dx] = full[:, -dx:]
        np.testing.assert_array_equal(frames[dx + 20], _crop(Image.fromarray(shifted)))
    # rotation: clockwise for positive angles, about the centre (OpenCV's own bilinear as a cross-check)
    frames = render_sequence(resized, 80, "rotate", 1, 0)
    h, w = full.shape[:2]
    for angle in (-15, 9):
        turn = lambda a: _crop(Image.fromarray(cv2.warpAffine(  # noqa: E731
            full, cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), a, 1.0), (w, h))))
        right = np.abs(frames[angle + 15].astype(int) - turn(-angle)).mean()
        wrong = np.abs(frames[angle + 15].astype(int) - turn(angle)).mean()
        assert right < 3 and wrong > 3 * right
    zoom = render_sequence(resized, 80, "zoom_blur", 1, 0)
    total = _crop(resized).astype(np.float32) / 255
    for i in range(1, 4):
        total = total + _crop(affine(resized, scale=1 + 0.004 * i)).astype(np.float32) / 255
    np.testing.assert_array_equal(zoom[3], (np.clip(total / 4, 0, 1) * 255).astype(np.uint8))
    tilt = render_sequence(resized, 80, "tilt", 1, 0)
    assert np.abs(tilt[15].astype(int) - _crop(resized)).mean() < 4  # the reference's middle frame: a slight shrink
    assert np.abs(tilt[0].astype(int) - _crop(resized)).mean() > np.abs(tilt[15].astype(int) - _crop(resized)).mean()


def test_lossless_encoding_round_trips_exactly(resized):
    frames = render_sequence(resized, 80, "gaussian_noise", 1, 0)
    payload = encode_frames(frames, recipe_for("lossless", "gaussian_noise"))
    np.testing.assert_array_equal(decode_frames(payload), frames)
    assert payload == encode_frames(frames, recipe_for("lossless", "gaussian_noise"))


@pytest.mark.parametrize("name", ["gaussian_noise", "translate"])
def test_reference_encoding_decodes_to_the_right_frames(resized, name):
    frames = render_sequence(resized, 80, name, 1, 0)
    recipe = recipe_for("reference", name)
    assert recipe["options"].get("tune") == ("grain" if "noise" in name else None)
    payload = encode_frames(frames, recipe)
    assert payload == encode_frames(frames, recipe)  # reproducible bytes
    back = decode_frames(payload)
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames).mean() < 12  # lossy, but the same pictures


def _yuv420p_video(frames: np.ndarray) -> bytes:
    """An H.264 yuv420p mp4 (how videos are usually released, ImageNet-P's included)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=1)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def test_one_converter_per_video_gives_to_ndarrays_pixels(resized):
    """rgb_frames (one swscale context per video) against PyAV's per-frame to_ndarray, the oracle, on the
    three pixel formats a corpus holds: yuv444p (reference), gbrp (lossless), yuv420p (released videos)."""
    import av

    from qrobust.shared.video import rgb_frames

    frames = render_sequence(resized, 80, "rotate", 1, 0)[:8]
    payloads = {"reference": encode_frames(frames, recipe_for("reference", "rotate")),
                "lossless": encode_frames(frames, recipe_for("lossless", "rotate")),
                "yuv420p": _yuv420p_video(frames)}
    formats = set()
    for name, payload in payloads.items():
        with av.open(io.BytesIO(payload)) as container:
            formats.add(container.streams.video[0].codec_context.pix_fmt)
            oracle = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        with av.open(io.BytesIO(payload)) as container:
            got = rgb_frames(container)
        assert len(got) == len(oracle) == 8, name
        for a, b in zip(got, oracle):
            assert a.dtype == np.uint8 and a.shape == (80, 80, 3)
            np.testing.assert_array_equal(a, b, err_msg=name)
    assert formats == {"yuv444p", "gbrp", "yuv420p"}


def test_clean_square_and_pil_decode_agree_on_16_bit_sources():
    from qrobust.generate.render import SampleContext, render_clean
    from qrobust.shared.sources import SourceSample
    from qrobust.shared.suites import load_suite

    deep = (np.linspace(0, 65535, 300 * 400).reshape(300, 400)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(deep).save(buf, format="PNG")
    data = buf.getvalue()
    pil = render_systematic(data, "pil", "pil-bilinear", SIZE, CROP)
    assert 100 < pil.mean() < 155  # high byte kept, not clipped to white
    np.testing.assert_array_equal(pil, render_systematic(data, "opencv", "pil-bilinear", SIZE, CROP))
    import tempfile, pathlib  # noqa: E401
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "deep.png"
        path.write_bytes(data)
        suite = load_suite("robustmq")
        ctx = SampleContext(SourceSample("deep", str(path), 0, len(data)), suite)
        square = [v for v in suite.variants if v.id == "clean/square"][0]
        np.testing.assert_array_equal(render_clean(square, ctx, 0), pil)


def test_sequence_payloads_are_checked_and_reproducible_across_processes(resized, tmp_path):
    import subprocess
    import sys

    from qrobust.shared.video import VideoError

    frames = render_sequence(resized, 80, "rotate", 1, 0)
    recipe = recipe_for("reference", "rotate")
    payload = encode_frames(frames, recipe)
    np.save(tmp_path / "frames.npy", frames)
    code = ("import numpy as np, sys; from qrobust.shared.video import encode_frames, recipe_for; "
            f"sys.stdout.buffer.write(encode_frames(np.load({str(tmp_path / 'frames.npy')!r}), "
            "recipe_for('reference', 'rotate')))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout == payload
    assert decode_frames(payload, expected_frames=31).shape == (31, 80, 80, 3)
    lossless = encode_frames(frames, recipe_for("lossless", "rotate"))
    with pytest.raises(VideoError, match="expected 31"):
        decode_frames(lossless[: len(lossless) // 2], expected_frames=31)
    png = io.BytesIO()
    Image.fromarray(frames[0]).save(png, format="PNG")
    with pytest.raises(VideoError, match="not an H.264"):
        decode_frames(png.getvalue())


@pytest.mark.parametrize("table, message", [
    ('[sequence]\nperturbations = ["gaussian_noise"]\ndifficulties = [2, 2]', "distinct integers"),
    ('[sequence]\nperturbations = ["gaussian_noise"]\ndifficulties = [true]', "distinct integers"),
    ('[clean]\nvariants = ["onecrop", "onecrop"]', "lists a name twice"),
])
def test_suite_tables_refuse_duplicates(tmp_path, table, message):
    from qrobust.shared.suites import SpecError, load_suite

    path = tmp_path / "s.toml"
    path.write_text(f"[geometry]\nresize = 64\ncrop = 56\n{table}\n")
    with pytest.raises(SpecError, match=message):
        load_suite(str(path))


def test_sequences_need_32_px(tmp_path):
    from qrobust.generate.render import check_renderable
    from qrobust.shared.suites import SpecError, load_suite

    path = tmp_path / "s.toml"
    path.write_text('[geometry]\nresize = 30\ncrop = 24\n[sequence]\nperturbations = ["snow"]\n')
    suite = load_suite(str(path))
    with pytest.raises(SpecError, match="crop 24 is below 32"):
        check_renderable(suite.variants[0], suite)


def test_x264_output_is_its_plain_c_output_and_stable(resized):
    """x264's AVX-512 routines in PyAV's wheels made bytes vary run to run; the recipes cap the CPU
    mask so that the output equals x264's plain C output, every time."""
    frames = render_sequence(resized, 80, "gaussian_noise", 1, 3)
    recipe = recipe_for("reference", "gaussian_noise")
    plain_c = dict(recipe, options=dict(recipe["options"], **{"x264-params": "asm=0"}))
    expected = encode_frames(frames, plain_c)
    clutter = []
    for _ in range(4):
        clutter.append(np.random.default_rng().bytes(1 << 16))  # move the allocator around between encodes
        assert encode_frames(frames, recipe) == expected


# ------------------------------------------- rewritten frame code against the previous implementation
# The perturbations below were rewritten for speed (preallocated frames, in-place float work, the
# motion blur's shifts as views, brightness with hsv2rgb factored); these are the previous
# implementations, kept as the oracle: the frames must not change by a single bit.


def _reference_to_uint8(x):
    return (np.clip(x, 0, 1) * 255).astype(np.uint8)


def _reference_motion_blur(image, radius, sigma, angle):
    blurred = imagecorruptions_compat.apply()._motion_blur(image, radius=radius, sigma=sigma, angle=angle)
    return np.clip(np.round(blurred), 0, 255).astype(np.uint8)


def _reference_frames(resized, crop, name, rng, difficulty):
    from skimage.color import hsv2rgb, rgb2hsv

    from qrobust.generate.sequences import GAUSSIAN_SIGMA, SHOT_LAMBDA, _snow_layer

    def cropped(image):
        return np.asarray(center_crop(image, crop))

    clean = cropped(resized)
    if name == "gaussian_noise":
        x = clean.astype(np.float32) / 255
        sigma = np.float32(GAUSSIAN_SIGMA[difficulty])
        return np.stack([clean] + [_reference_to_uint8(x + sigma * rng.standard_normal(x.shape, dtype=np.float32))
                                   for _ in range(30)])
    if name == "shot_noise":
        x, lam = clean / 255.0, SHOT_LAMBDA[difficulty]
        return np.stack([clean] + [_reference_to_uint8(rng.poisson(x * lam) / lam) for _ in range(30)])
    if name == "motion_blur":
        return np.stack([_reference_motion_blur(clean, 10, 3, (i - 30) * 4) for i in range(31)])
    if name == "zoom_blur":
        total, frames = clean.astype(np.float32) / 255, [clean]
        for i in range(1, 31):
            total = total + cropped(affine(resized, scale=1 + 0.004 * i)).astype(np.float32) / 255
            frames.append(_reference_to_uint8(total / (i + 1)))
        return np.stack(frames)
    if name == "snow":
        import cv2

        x = clean / 255.0
        gray = cv2.cvtColor(x.astype(np.float32), cv2.COLOR_RGB2GRAY)[..., None]
        base = 0.85 * x + 0.15 * np.maximum(x, gray * 1.5 + 0.5)
        layer = _snow_layer(crop, rng)
        frames = []
        for i in range(31):
            flakes = (_reference_motion_blur(layer, 14, 4, 4 * i - 150) / 255.0)[..., None]
            frames.append(_reference_to_uint8(base + flakes + np.rot90(flakes, k=2)))
        return np.stack(frames)
    if name == "brightness":
        hsv = rgb2hsv(clean / 255.0)
        frames = []
        for i in range(31):
            shifted = hsv.copy()
            shifted[..., 2] = np.clip(shifted[..., 2] + (i - 15) * 0.02, 0, 1)
            frames.append(_reference_to_uint8(hsv2rgb(shifted)))
        return np.stack(frames)
    if name == "translate":
        return np.stack([cropped(affine(resized, translate=(dx, 0), resample=Image.NEAREST)) for dx in range(-20, 21)])
    if name == "rotate":
        return np.stack([cropped(affine(resized, angle=a)) for a in range(-15, 16)])
    if name == "scale":
        return np.stack([cropped(affine(resized, scale=(2.5 * i + 40) / 100)) for i in range(31)])
    raise KeyError(name)


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "motion_blur", "zoom_blur", "snow", "brightness",
                                  "translate", "rotate", "scale"])
def test_rewritten_perturbations_equal_the_previous_implementation(resized, name):
    odd = photo("coffee").convert("RGB").resize((61, 45), Image.BILINEAR)  # non-square, odd, small
    for image, crop, seed in ((resized, 80, 3), (odd, 40, 11)):
        for difficulty in ((1, 2, 3) if "noise" in name else (1,)):
            new = render_sequence(image, crop, name, difficulty, seed)
            old = _reference_frames(image, crop, name, np.random.default_rng(seed), difficulty)
            assert new.dtype == old.dtype == np.uint8 and new.shape == old.shape, (name, crop)
            np.testing.assert_array_equal(new, old, err_msg=f"{name} difficulty {difficulty} crop {crop}")


def test_motion_blur_equals_the_reference_port_bit_for_bit():
    """The float blur itself (before rounding), for colour and gray images, every direction, and images
    narrower than the kernel (where the reference stops early at the border)."""
    from qrobust.generate.sequences import _MotionBlur

    reference = imagecorruptions_compat.apply()._motion_blur
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (37, 52, 3), dtype=np.uint8), rng.integers(0, 256, (48, 48), dtype=np.uint8),
              rng.integers(0, 256, (5, 9, 3), dtype=np.uint8), rng.integers(0, 256, (12, 3), dtype=np.uint8)]
    for image in images:
        for radius, sigma in ((10, 3), (14, 4), (2, 1.5)):
            blur = _MotionBlur(image, radius, sigma)
            for angle in (-150, -120, -93, -45, -4, 0, 1, 30, 45, 90, 135, 180, 222, 270, 359):
                expected = reference(image, radius=radius, sigma=sigma, angle=angle)
                got = blur(angle)
                assert got.dtype == expected.dtype and got.shape == expected.shape
                np.testing.assert_array_equal(got, expected, err_msg=f"{image.shape} r{radius} angle {angle}")
                np.testing.assert_array_equal(blur.uint8(angle), _reference_motion_blur(image, radius, sigma, angle))


def test_brightness_factors_equal_skimage_hsv2rgb():
    from skimage.color import hsv2rgb, rgb2hsv

    from qrobust.generate.sequences import _hsv2rgb_factors

    rng = np.random.default_rng(1)
    hsv = rng.random((40, 30, 3))
    hsv[:5, :, 1] = 0  # gray pixels
    hsv[5:10, :, 0] = np.array([0, 1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6] * 5)[:30]  # sector boundaries
    photo_hsv = rgb2hsv(np.asarray(photo("astronaut").convert("RGB").resize((30, 40))) / 255.0)
    for base in (hsv, photo_hsv):
        factors = _hsv2rgb_factors(base)
        for v in (base[..., 2], rng.random(base.shape[:2]), np.ones(base.shape[:2]), np.zeros(base.shape[:2])):
            shifted = base.copy()
            shifted[..., 2] = v
            np.testing.assert_array_equal(v[..., None] * factors, hsv2rgb(shifted))
