"""Fuzzing the parsers of untrusted input: the shard reader, the manifest parser, and the report's reading
of results folders.

Whatever the bytes, the only outcomes allowed are a correct parse or qrobust's own errors
(:class:`~qrobust.score.stream.CorpusError`, :class:`~qrobust.shared.manifest.ManifestError`,
:class:`~qrobust.shared.shards.ShardError`): never another exception, a hang or a crash. ``qrobust
report`` on edited summaries exits 0 or 2 (one line on stderr), and what it writes holds no hostile
name unescaped.

Reproducible and bounded for CI: ``derandomize=True`` (examples drawn from a seed fixed per test) and
``database=None``; the default example counts keep the module well under a minute on 2 cores. For a
longer local run, ``QROBUST_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz.py`` sets every test's count (and
``QROBUST_FUZZ_SEED=<n>`` draws other examples than CI's).
"""
from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import os
import re
import signal
import tarfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from helpers import MEAN_MODEL, small_corpus
from qrobust.cli import main
from qrobust.score.stream import Corpus, CorpusError, iter_samples
from qrobust.shared.manifest import SCHEMA, ManifestError, manifest_problems, parse_manifest
from qrobust.shared.shards import ShardError, scan_shard

EXAMPLES = int(os.environ.get("QROBUST_FUZZ_EXAMPLES", "0"))
SEED = os.environ.get("QROBUST_FUZZ_SEED")
HANG_S = 20  # one example that runs this long is a hang


def fuzz(default_examples: int, deadline_s: float):
    """Hypothesis settings: ``default_examples`` unless QROBUST_FUZZ_EXAMPLES says otherwise."""
    def wrap(test):
        test = settings(max_examples=EXAMPLES or default_examples, deadline=timedelta(seconds=deadline_s),
                        derandomize=SEED is None, database=None, print_blob=False,
                        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                               HealthCheck.function_scoped_fixture])(test)
        return seed(int(SEED))(test) if SEED is not None else test
    return wrap


class Hang(BaseException):
    """Not an Exception: no `except Exception` in the code under test may swallow it."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def alarm(signum, frame):
        raise Hang(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return small_corpus(tmp_path_factory.mktemp("fuzz"), "clean/onecrop,natural/fog-1,sequence/rotate",
                        per_class=1)


@pytest.fixture(scope="module")
def shards(corpus) -> dict[str, tuple[bytes, tuple]]:
    """Real shards to mutate, with their payload shape: PNG, JPEG, and one lossless H.264 sample."""
    source = Corpus(str(corpus))
    out = {}
    for vid in ("clean/onecrop", "natural/fog-1"):
        out[vid] = (source.shard_bytes(source.manifest["variants"][vid]["shards"][0]), source.payload_shape(vid))
    data = source.shard_bytes(source.manifest["variants"]["sequence/rotate"]["shards"][0])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # one sample: decoding 31 frames is the slow part
        first = list(tar)[:2]
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as one:
            for m in first:
                one.addfile(m, tar.extractfile(m))
    out["sequence/rotate"] = (buf.getvalue(), source.payload_shape("sequence/rotate"))
    for data, shape in out.values():  # warm up the decoders (imports) outside the deadlines
        assert [p.shape for _, _, p in iter_samples("warm", data, shape)][0] == shape
    return out


def hot_spots(data: bytes) -> list[tuple[int, int]]:
    """(start, span) of the parts where a mutation reaches most code: tar headers and payload headers."""
    spots = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar:
            spots += [(m.offset, 512), (m.offset_data, 64)]
    return spots


@st.composite
def mutations(draw, original: bytes, spots: list[tuple[int, int]]) -> bytes:
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        if draw(st.booleans()):
            start, span = draw(st.sampled_from(spots))
            pos = min(start + draw(st.integers(0, span - 1)), len(data) - 1)
        else:
            pos = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(("flip", "set", "insert", "delete", "truncate")))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[pos] = draw(st.sampled_from((0, 0x20, 0x30, 0x37, 0x7F, 0x80, 0xFF)) | st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 700))]
        else:
            del data[pos:]
    return bytes(data)


def tar_of(items) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in items:
            info = copy.copy(info)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# (offset, length) of the USTAR header fields: name, mode, uid, gid, size, mtime, type, linkname, magic, prefix
HEADER_FIELDS = [(0, 100), (100, 8), (108, 8), (116, 8), (124, 12), (136, 12), (156, 1), (157, 100), (257, 8),
                 (345, 155)]


@st.composite
def payload_mutations(draw, original: bytes) -> bytes:
    """A well-formed tar whose members' contents are mutated: the decoders get the damage."""
    with tarfile.open(fileobj=io.BytesIO(original)) as tar:
        items = [(m, tar.extractfile(m).read()) for m in tar]
    i = draw(st.integers(0, len(items) - 1))
    info, data = items[i]
    spots = [(0, min(64, len(data)))] if data else [(0, 1)]
    items[i] = (info, draw(mutations(data, spots)) if data else draw(st.binary(max_size=16)))
    return tar_of(items)


@st.composite
def header_mutations(draw, original: bytes) -> bytes:
    """A header field set to hostile values, with the header checksum fixed: tarfile accepts it, qrobust judges."""
    data = bytearray(original)
    with tarfile.open(fileobj=io.BytesIO(original)) as tar:
        offsets = [m.offset for m in tar]
    for _ in range(draw(st.integers(1, 2))):
        at = draw(st.sampled_from(offsets))
        start, length = draw(st.sampled_from(HEADER_FIELDS))
        value = draw(st.sampled_from([b"../x.png", b"/etc/passwd", b"a.pickle", b"a.npy", b"77777777777",
                                      b"\x80" + b"\xff" * 11, b"0", b"1", b"2", b"5", b"6", b"L", b"K", b"x",
                                      b"ustar\x0000", b"-1"]) | st.binary(max_size=length))
        data[at + start:at + start + length] = value[:length].ljust(length, b"\0")
        data[at + 148:at + 156] = b" " * 8
        data[at + 148:at + 156] = b"%06o\0 " % sum(data[at:at + 512])
    return bytes(data)


def read_shard(data: bytes, shape) -> list | None:
    """The samples of a shard, or None for qrobust's own refusal; anything else propagates (a failure)."""
    with time_limit(HANG_S):
        try:
            samples = list(iter_samples("fuzz.tar", data, shape))
        except CorpusError:
            return None
    for key, label, pixels in samples:  # a correct parse: what the scorer relies on
        assert isinstance(key, str) and isinstance(label, int) and label >= 0
        assert isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8 and pixels.shape == shape
    assert [k for k, _, _ in samples] == sorted({k for k, _, _ in samples})
    return samples


# ---- the shard reader ---------------------------------------------------------------------------------


@fuzz(500, 2)
@given(data=st.binary(max_size=3000) | st.builds(lambda head, tail: head + tail,
                                                 st.sampled_from([b"", b"\0" * 512, b"ustar\x0000"]),
                                                 st.binary(max_size=1500)))
def test_random_bytes_are_refused_or_read(data):
    read_shard(data, (36, 36, 3))
    with time_limit(HANG_S):
        try:
            scan_shard(data)
        except ShardError:
            pass


@pytest.mark.parametrize("vid, examples", [("clean/onecrop", 500), ("natural/fog-1", 500), ("sequence/rotate", 60)])
def test_mutated_shards_are_refused_or_read(shards, vid, examples):
    original, shape = shards[vid]
    reference = read_shard(original, shape)
    assert reference is not None and len(reference) >= 1
    outcomes = {"read": 0, "refused": 0}

    @fuzz(examples, 5)
    @given(data=mutations(original, hot_spots(original)) | payload_mutations(original) | header_mutations(original))
    def check(data):
        result = read_shard(data, shape)
        outcomes["read" if result is not None else "refused"] += 1
        if data == original:
            assert [(k, c) for k, c, _ in result] == [(k, c) for k, c, _ in reference]

    check()
    print(f"{vid}: {outcomes}")
    assert outcomes["refused"] > 0  # the mutations do reach the checks


# ---- the manifest parser ------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=25)


def use_manifest(manifest: dict) -> None:
    """What verify and score do with a parsed manifest (besides reading shards): only qrobust errors allowed."""
    from qrobust.score.run import _layout, plan_units
    from qrobust.score.summary import compute_summary
    from qrobust.shared.manifest import plan_digest, plan_of

    manifest_problems(manifest)
    plan_digest(plan_of(manifest))
    variants = sorted(manifest["variants"])
    source = Corpus.__new__(Corpus)
    source.manifest = manifest
    for vid in variants:
        source.payload_shape(vid)
    try:
        plan_units(manifest, variants, None)
    except CorpusError:
        return
    rows = manifest["samples"]["count"]
    if rows <= 64:
        layout = _layout(manifest, variants, rows)
        predictions = {vid: np.broadcast_to(np.arange(5, dtype=np.int32), shape) for vid, shape in layout.items()}
        compute_summary(predictions, np.zeros(rows, np.int64), manifest, model={}, corpus={}, env={})


def parse(raw: bytes):
    with time_limit(HANG_S):
        try:
            manifest = parse_manifest(raw, "fuzz/manifest.json")
        except ManifestError:
            return None
        use_manifest(manifest)
        return manifest


@fuzz(400, 1)
@given(doc=json_values | st.dictionaries(st.sampled_from(["schema", "suite", "samples", "variants", "classes",
                                                          "seed", "source", "versions", "plan_sha256", "card"]),
                                         json_values).map(lambda d: {**d, "schema": SCHEMA}),
       raw=st.none() | st.binary(max_size=200))
def test_random_documents_are_refused_or_parsed(doc, raw):
    parse(raw if raw is not None else json.dumps(doc).encode())


def test_pathological_json_is_refused():
    for raw in (b"[" * 100_000, b'{"schema": ' + b"1" * 5000 + b"}", b"\xff\xfe{", b"", b"NaN",
                json.dumps({"schema": SCHEMA, "samples": {"count": True}, "variants": {}}).encode()):
        assert parse(raw) is None


@pytest.fixture(scope="module")
def manifest(corpus) -> dict:
    return json.loads((corpus / "manifest.json").read_text())


def paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from paths(v, prefix + (i,))


@st.composite
def edited(draw, manifest: dict) -> dict:
    doc = copy.deepcopy(manifest)
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(list(paths(doc))[1:]))
        parent = doc
        for step in where[:-1]:
            parent = parent[step]
        op = draw(st.sampled_from(("delete", "replace", "retype", "duplicate")))
        value = parent[where[-1]]
        if op == "delete":
            del parent[where[-1]]
        elif op == "replace":
            parent[where[-1]] = draw(json_values)
        elif op == "retype":
            parent[where[-1]] = draw(st.sampled_from([None, True, -1, 0, 2 ** 70, 1.5, "", "../x", "pipe:x", [], {},
                                                      [value], {"x": value}, str(value)]))
        elif isinstance(parent, list):
            parent.insert(where[-1], copy.deepcopy(value))
        else:
            parent[f"{where[-1]}x"] = copy.deepcopy(value)
        if not (isinstance(doc, dict) and list(paths(doc))[1:]):
            break
    return doc


def test_edited_manifests_are_refused_or_parsed(manifest, corpus, tmp_path):
    assert parse(json.dumps(manifest).encode()) == manifest
    outcomes = {"parsed": 0, "refused": 0}

    @fuzz(500, 1)
    @given(doc=edited(manifest))
    def check(doc):
        outcomes["parsed" if parse(json.dumps(doc).encode()) is not None else "refused"] += 1

    check()
    print(outcomes)
    assert outcomes["parsed"] > 0 and outcomes["refused"] > 0


def test_mutated_manifest_bytes_are_refused_or_parsed_and_verified(manifest, corpus, tmp_path):
    """Byte mutations of the real manifest, then `verify_corpus` on a copy of the corpus holding it."""
    import shutil

    from qrobust.shared.verify import verify_corpus

    copy_ = tmp_path / "corpus"
    shutil.copytree(corpus, copy_)
    raw = (corpus / "manifest.json").read_bytes()
    spots = [(i, 40) for i in range(0, len(raw), max(1, len(raw) // 64))]

    @fuzz(300, 2)
    @given(data=mutations(raw, spots))
    def check(data):
        parsed = parse(data)
        (copy_ / "manifest.json").write_bytes(data)
        with time_limit(HANG_S):
            try:
                problems = verify_corpus(copy_, rehash=False, workers=1)
            except ManifestError:
                assert parsed is None
                return
        assert parsed is not None and all(isinstance(p, str) for p in problems)

    check()


# ---- the report ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scored(corpus, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """A real results folder (every family of the fuzz corpus and an attack), and a copy made a quantized model
    of the same architecture, so that the report compares the two from their per-sample columns."""
    import shutil

    tmp = tmp_path_factory.mktemp("scored")
    assert main(["-q", "score", "--corpus", str(corpus), "--model", MEAN_MODEL, "--out",
                 str(tmp / "fp"), "--workers", "0", "--attacks", "fgsm-linf", "--budgets", "small"]) == 0
    shutil.copytree(tmp / "fp", tmp / "q")
    out = {}
    for name in ("fp", "q"):
        # a collaborator who edits a summary can drop its digests too: the report then warns that it cannot
        # check the folder and reads it, so the edits below reach the parser and the writers
        (tmp / name / "digests.json").unlink()
        summary = json.loads((tmp / name / "summary.json").read_text())
        if name == "q":
            summary["model"]["quant"] = {"method": "lsq", "w_bits": 4, "a_bits": 4}
        out[name] = (tmp / name, summary)
    return out


HOSTILE_TEXT = ["<script>alert(1)</script>", '"onload="alert(1)', "\\input{/etc/passwd}", "^^5cinput",
                '=HYPERLINK("http://evil.example")', "+1+1", "@SUM(1)", "-2+3", "a|b\nc", "x\x1b[2J\u202ey",
                "$\\frac{$", "{nc}{0:>99999999}", "../../x", "](javascript:alert(1))"]
RETYPES = [None, True, -1, 0, 0.5, 1e300, -(10 ** 30), float("nan"), float("inf"), "", "0.5", [], {}, [1, 2],
           {"x": 1}, [[[[[[[[[[0]]]]]]]]]]]


def deep(levels: int):
    value = 0
    for _ in range(levels):
        value = {"x": value}
    return value


@st.composite
def summary_edits(draw, summary: dict) -> dict:
    """1-3 edits of a real summary: a field deleted or of another type, a name or key made hostile, absurd
    nesting."""
    doc = copy.deepcopy(summary)
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(list(paths(doc))[1:]))
        parent = doc
        for step in where[:-1]:
            parent = parent[step]
        key, value = where[-1], parent[where[-1]]
        op = draw(st.sampled_from(("delete", "retype", "hostile", "rename", "deep")))
        if op == "delete":
            del parent[key]
        elif op == "retype":
            parent[key] = copy.deepcopy(draw(st.sampled_from(RETYPES)))  # later edits must not reach it
        elif op == "hostile" or (op == "rename" and isinstance(parent, list)):
            text = draw(st.sampled_from(HOSTILE_TEXT))
            parent[key] = text + value if isinstance(value, str) and draw(st.booleans()) else text
        elif op == "rename":  # a key made hostile: a corruption, budget, attack or family name
            parent[draw(st.sampled_from(HOSTILE_TEXT)) + str(key)] = parent.pop(key)
        else:
            parent[key] = deep(draw(st.sampled_from((5, 20, 40))))
        if not (isinstance(doc, dict) and list(paths(doc))[1:]):
            break
    return doc


def check_outputs(out: Path) -> None:
    """What a report wrote holds no hostile name that its format would run or misread."""
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "<script" not in page.lower() and '"onload=' not in page and "\x1b" not in page
    for path in out.rglob("*"):
        if path.suffix == ".tex":
            tex = path.read_text(encoding="utf-8")
            assert "\\input" not in tex and "^^" not in tex, path.name
        elif path.suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                for cell in (c for row in csv.reader(f) for c in row):
                    assert cell[:1] not in ("=", "+", "@", "\t", "\r", "\n"), (path.name, cell[:40])
                    if cell.startswith("-"):
                        float(cell)  # a negative number qrobust wrote; a name would have been quoted
        elif path.suffix == ".md":
            assert "<" not in path.read_text(encoding="utf-8"), path.name
        elif path.suffix == ".svg":
            assert "<script" not in path.read_text(encoding="utf-8"), path.name
    findings = (out / "findings.txt").read_text(encoding="utf-8")
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f\u2028\u2029\u202a-\u202e]", findings)


def test_edited_summaries_are_reported_or_refused_in_one_line(scored, tmp_path, capsys):
    """Edits of a real summary.json (beside its real per-sample columns): ``qrobust report`` exits 0 with every
    output escaped, or 2 with one line naming the summary; never a traceback, never a hang."""
    (fp, fp_summary), (q, q_summary) = scored["fp"], scored["q"]
    outcomes = {0: 0, 2: 0}

    @fuzz(30, 20)
    @given(doc=summary_edits(q_summary), which=st.sampled_from(("fp", "q")))
    def check(doc, which):
        folder = fp if which == "fp" else q
        (folder / "summary.json").write_text(json.dumps(doc))
        out = tmp_path / f"out{sum(outcomes.values())}"
        try:
            with time_limit(HANG_S):
                code = main(["-q", "report", str(fp), str(q), "--out", str(out)])
        finally:
            for path, summary in ((fp, fp_summary), (q, q_summary)):
                (path / "summary.json").write_text(json.dumps(summary))
        err = capsys.readouterr().err
        assert code in (0, 2) and "Traceback" not in err, err
        outcomes[code] += 1
        if code == 2:
            assert err.count("\n") == 1 and err.startswith("qrobust report: error: "), err
            assert "summary.json" in err or "scored on different corpora" in err, err  # which file(s)
        else:
            check_outputs(out)

    check()
    print(outcomes)
    assert outcomes[0] > 0 and outcomes[2] > 0  # the edits reach both the checks and the writers
