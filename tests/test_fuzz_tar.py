"""Random mutations of real shards' tar headers, fed to every reader of shards: score, verify, pack, import
and train.

Mutations: size fields (octal, base-256, negative, garbage), type fields, pax headers (long paths, sizes,
record lengths past the end, malformed records, one of a few MB: the quadratic case of CPython's tarfile
before 3.11.10), global pax headers, GNU long names and links, runs of extension headers, truncations, bad
checksums, early end blocks, and pairs of these. Each reader either reads the shard or refuses it with its
own one-line error (a rejected entry for training); any other exception fails the test. The seed is fixed.
"""
from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
import tarfile
from pathlib import Path

import pytest

from helpers import small_corpus
from qrobust.cli import main
from qrobust.generate.pack import PackError, pack
from qrobust.generate.release_import import ReleaseError, _write_shard
from qrobust.score.stream import CorpusError, iter_samples
from qrobust.shared.shards import MAX_EXTENSION_BYTES, ShardError, iter_tar, scan_shard
from qrobust.shared.verify import verify_corpus
from qrobust.train.data import DataError, open_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEED = 20240917
CASES = 250
VARIANTS = {"clean/onecrop": "clean/onecrop/onecrop-000000.tar", "sequence/rotate": "sequence/rotate/rotate-000000.tar"}
BIG_PAX = 3 << 20  # a pax header of 3 MB of digits: hours for tarfile's regex before the fix


# ---- building tar pieces ------------------------------------------------------------------------------------


def checksum(header: bytearray) -> bytearray:
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return header


def extension(kind: bytes, payload: bytes, name: str = "././@PaxHeader") -> bytes:
    """An extension header (pax x/g, GNU L/K) holding ``payload``, as writers emit it, padded to blocks."""
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(payload)
    return info.tobuf(tarfile.USTAR_FORMAT) + payload + b"\0" * (-len(payload) % 512)


def record(key: str, value: str | bytes) -> bytes:
    """One pax record with its correct length prefix."""
    body = b" " + key.encode() + b"=" + (value if isinstance(value, bytes) else value.encode()) + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n).encode() + body


PAX_PAYLOADS = [
    lambda rng: record("path", "a" * rng.randint(101, 3000) + ".png"),
    lambda rng: record("path", "../../etc/passwd"),
    lambda rng: record("path", "astronaut_0.pickle"),
    lambda rng: record("size", str(rng.choice([10 ** 12, 0, 1, 7, 2 ** 63]))),
    lambda rng: record("size", rng.choice(["-1", "abc", "", "1e9", " 12"])),
    lambda rng: b"99999999999999999999 path=x\n",
    lambda rng: b"5 a=b\n" * rng.randint(1, 3),
    lambda rng: b"0 \n",
    lambda rng: record("hdrcharset", "BINARY") + record("path", b"\xff\xfe.png"),
    lambda rng: record("GNU.sparse.size", "4096") + record("GNU.sparse.numblocks", "1"),
    lambda rng: record("comment", "x" * (MAX_EXTENSION_BYTES - 200)),  # just under the bound: read
    lambda rng: record("comment", "x" * (MAX_EXTENSION_BYTES + 10)),  # just over: refused unread
    lambda rng: b"1" * BIG_PAX,
    lambda rng: b"1" * rng.randint(1, 60_000),
    lambda rng: rng.randbytes(rng.randint(1, 2000)),
]
SIZE_FIELDS = [
    lambda rng, size: b"%011o\0" % rng.randint(0, 2 * size + 1024),
    lambda rng, size: b"%011o\0" % max(0, size + rng.choice([-513, -1, 1, 512])),
    lambda rng, size: b"77777777777\0",
    lambda rng, size: b"\x80" + rng.randint(1, 2 ** 88).to_bytes(11, "big"),
    lambda rng, size: b"\xff" * 12,
    lambda rng, size: rng.choice([b"99999999999\0", b"-1\0" + b"\0" * 9, b"+17\0" + b"\0" * 8, b"1_0\0" + b"\0" * 8,
                                  b" " * 11 + b"\0", b"\0" * 12]),
    lambda rng, size: rng.randbytes(12),
]
TYPES = [b"0", b"\0", b"1", b"2", b"3", b"5", b"6", b"7", b"x", b"g", b"L", b"K", b"S", b"V", b"Z"]


def offsets(data: bytes) -> list[tuple[int, int]]:
    """(header offset, size) of every member of a well-formed tar: only ever of an original shard (tarfile
    itself is not handed a mutated one: it could take hours)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.offset, m.size) for m in tar]


IN_PLACE = ("size field", "type field", "bad checksum", "garbage after the end")  # members stay where they were


def mutate(rng: random.Random, data: bytes, members: list[tuple[int, int]]) -> tuple[str, bytes]:
    """One mutation of a shard whose members start at ``members``; (what was done, the bytes)."""
    at, size = rng.choice(members)
    kind = rng.randrange(10)
    if kind == 0:
        header = bytearray(data[at:at + 512])
        header[124:136] = rng.choice(SIZE_FIELDS)(rng, size)
        return "size field", data[:at] + bytes(checksum(header)) + data[at + 512:]
    if kind == 1:
        header = bytearray(data[at:at + 512])
        header[156:157] = rng.choice(TYPES)
        return "type field", data[:at] + bytes(checksum(header)) + data[at + 512:]
    if kind == 2:
        return "pax header", data[:at] + extension(b"x", rng.choice(PAX_PAYLOADS)(rng)) + data[at:]
    if kind == 3:
        return "global pax header", extension(b"g", rng.choice(PAX_PAYLOADS)(rng)) + data
    if kind == 4:
        name = ("n" * rng.choice([10, 150, 2000, MAX_EXTENSION_BYTES + 5])).encode() + b".png\0"
        return "GNU long name", data[:at] + extension(rng.choice([b"L", b"K"]), name, "././@LongLink") + data[at:]
    if kind == 5:
        run = b"".join(extension(b"x", record("comment", str(i))) for i in range(rng.randint(2, 9)))
        return "run of pax headers", data[:at] + run + data[at:]
    if kind == 6:
        return "truncated", data[:rng.randrange(len(data))]
    if kind == 7:
        header = bytearray(data[at:at + 512])
        header[rng.randrange(512)] ^= 1 << rng.randrange(8)
        return "bad checksum", data[:at] + bytes(header) + data[at + 512:]
    if kind == 8:
        return "early end", data[:at] + b"\0" * 1024 + data[at:]
    return "garbage after the end", data + rng.randbytes(rng.randint(1, 3000))


def cases(shards: dict[str, bytes]) -> list[tuple[str, str, bytes]]:
    """(variant, what, bytes) of every case, from the fixed seed; a few chosen ones first. A quarter of the
    cases mutate twice (the second time where the first left every member in place)."""
    rng = random.Random(SEED)
    members = {vid: offsets(data) for vid, data in shards.items()}
    out = []
    for vid, data in shards.items():
        first = members[vid][1][0]
        out += [(vid, "pax header of 3 MB", data[:first] + extension(b"x", b"1" * BIG_PAX) + data[first:]),
                (vid, "GNU long name of 70 kB", data[:first] + extension(b"L", b"n" * 70_000, "././@LongLink")
                 + data[first:])]
    for _ in range(CASES):
        vid = rng.choice(sorted(shards))
        what, data = mutate(rng, shards[vid], members[vid])
        if what in IN_PLACE and rng.random() < 0.4:
            more, data = mutate(rng, data, members[vid])
            what = f"{what} + {more}"
        out.append((vid, what, data))
    return out


# ---- the readers -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return small_corpus(tmp_path_factory.mktemp("fuzz-tar"), ",".join(VARIANTS))


def one_line(message: str) -> None:
    assert message and "\n" not in message and "Traceback" not in message, message


def read_by_score(vid: str, data: bytes, shape) -> str:
    try:
        list(iter_samples(VARIANTS[vid], data, shape))
    except CorpusError as e:
        one_line(str(e))
        return "refused"
    return "read"


def read_by_verify(copy: Path, manifest: dict, vid: str, data: bytes) -> str:
    plant(copy, manifest, vid, data)
    problems = verify_corpus(copy, workers=1)
    for problem in problems:
        one_line(problem)
    return "refused" if problems else "read"


def read_by_pack(copy: Path, out: Path, vid: str, limit: int | None) -> str:
    try:
        pack(str(copy), str(out), only=[vid], limit=limit, progress=False)
    except PackError as e:
        one_line(str(e))
        assert not (out / "manifest.json").exists()
        return "refused"
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return "read"


def read_by_import(folder: Path, vid: str, data: bytes, release: list, shape) -> str:
    """import's reading of a shard it finds in --out: kept if it holds what the import would write, else
    rebuilt from the released files (or a one-line refusal); never anything else."""
    path = folder / "shard.tar"
    path.write_bytes(data)
    ext = "png" if vid.startswith("clean") else "mkv"
    try:
        summary = _write_shard(ext, str(path), release, None, shape)
    except ReleaseError as e:
        one_line(str(e))
        return "refused"
    assert summary["count"] == len(release)
    return "kept" if path.read_bytes() == data else "rebuilt"


def read_by_train(folder: Path, data: bytes) -> str:
    (folder / "part-000000.tar").write_bytes(data)
    try:
        dataset = open_data(folder, image_size=16)
    except DataError as e:
        one_line(str(e))
        return "refused"
    for where, reason in dataset.rejected:
        one_line(f"{where}: {reason}")
    for i in range(len(dataset)):
        dataset[i]  # a tensor, or a BadSample the loader skips
    return "rejected some" if dataset.rejected else "read"


def plant(copy: Path, manifest: dict, vid: str, data: bytes) -> None:
    """The shard of ``vid`` replaced by ``data``, the manifest's size and sha256 of it rewritten to match."""
    (copy / VARIANTS[vid]).write_bytes(data)
    edited = json.loads(json.dumps(manifest))
    shard = edited["variants"][vid]["shards"][0]
    shard["bytes"], shard["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(edited, indent=1, sort_keys=True))


def test_mutated_tar_headers_are_read_or_refused_in_one_line_by_every_reader(corpus, tmp_path):
    from qrobust.score.stream import Corpus

    source = Corpus(str(corpus))
    shards = {vid: (corpus / name).read_bytes() for vid, name in VARIANTS.items()}
    shapes = {vid: source.payload_shape(vid) for vid in VARIANTS}
    manifest = json.loads((corpus / "manifest.json").read_text())
    copy = tmp_path / "copy"
    shutil.copytree(corpus, copy)
    release = {}  # the released files an import would write each variant's first shard from
    for vid, data in shards.items():
        folder = tmp_path / "release" / vid
        folder.mkdir(parents=True)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            payloads = [(m.name, tar.extractfile(m).read()) for m in tar]
        labels = {n.split(".")[0]: int(b) for n, b in payloads if n.endswith(".cls")}
        release[vid] = []
        for name, payload in payloads:
            if not name.endswith(".cls"):
                (folder / name).write_bytes(payload)
                release[vid].append((name.split(".")[0], labels[name.split(".")[0]], str(folder / name), len(payload)))
    outcomes: dict[str, dict[str, int]] = {}
    for i, (vid, what, data) in enumerate(cases(shards)):
        for name in VARIANTS.values():  # the last case's shard back to the original
            shutil.copyfile(corpus / name, copy / name)
        results = {
            "score": read_by_score(vid, data, shapes[vid]),
            "verify": read_by_verify(copy, manifest, vid, data),
            "pack": read_by_pack(copy, tmp_path / f"packed-{i}", vid, 1 if i % 2 else None),
            "import": read_by_import(tmp_path / "release", vid, data, release[vid], shapes[vid]),
            "train": read_by_train(_fresh(tmp_path / "train"), data) if vid == "clean/onecrop" else "n/a",
        }
        if what.startswith(("pax header of 3 MB", "GNU long name of 70 kB")):
            assert {results[r] for r in ("score", "verify", "pack")} == {"refused"}, (what, results)
            assert results["import"] == "rebuilt" and results["train"] in ("refused", "n/a"), (what, results)
        for reader, result in results.items():
            outcomes.setdefault(reader, {}).setdefault(result, 0)
            outcomes[reader][result] += 1
    print(outcomes)
    for reader in ("score", "verify", "pack"):
        assert outcomes[reader].get("refused", 0) > 0 and outcomes[reader].get("read", 0) > 0, outcomes
    assert outcomes["import"].get("rebuilt", 0) > 0 and outcomes["import"].get("kept", 0) > 0, outcomes


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def test_extension_headers_are_refused_by_size_before_any_is_parsed():
    """The bound is on the header's declared size: a pax or GNU header over it is refused whatever it holds,
    one at the bound is parsed (linearly), and a run of them is cut short."""
    tail = tarfile.TarInfo("a.cls")
    tail.size = 1
    member = tail.tobuf(tarfile.USTAR_FORMAT) + b"1" + b"\0" * 511 + b"\0" * 1024
    for kind in (b"x", b"g", b"L", b"K"):
        with pytest.raises(ShardError, match=f"an extension header of {MAX_EXTENSION_BYTES + 1} bytes"):
            list(iter_tar(extension(kind, b"1" * (MAX_EXTENSION_BYTES + 1)) + member))
    at_bound = record("comment", "y" * (MAX_EXTENSION_BYTES - 100))
    at_bound = at_bound + b"\0" * (MAX_EXTENSION_BYTES - len(at_bound))
    assert [m.name for m in iter_tar(extension(b"x", at_bound) + member)] == ["a.cls"]
    assert [m.name for m in iter_tar(extension(b"x", record("path", "b.cls")) + member)] == ["b.cls"]
    with pytest.raises(ShardError, match="more than 4 extension headers in a row"):
        list(iter_tar(extension(b"x", record("comment", "z")) * 5 + member))
    with pytest.raises(ShardError, match="malformed pax record"):
        list(iter_tar(extension(b"x", b"1" * 60_000) + member))


def test_the_bounded_reader_reads_what_tarfile_reads(corpus):
    """On well-formed archives (ustar, GNU and pax; long and non-ASCII names; folders; a global header), the
    same members, offsets and sizes as tarfile."""
    rng = random.Random(SEED)
    names = ["a.cls", "a.png", "b\u00e9t\u00e9.cls", "c" * 150 + ".jpg", "p" * 90 + "/" + "q" * 90 + ".png"]
    archives = [(corpus / name).read_bytes() for name in VARIANTS.values()]
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            for name in names:
                if fmt == tarfile.USTAR_FORMAT and (len(name) > 100 and "/" not in name or not name.isascii()):
                    continue
                payload = rng.randbytes(rng.randint(0, 1500))
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            folder = tarfile.TarInfo("folder")
            folder.type = tarfile.DIRTYPE
            tar.addfile(folder)
        archives.append(buf.getvalue())
    archives.append(extension(b"g", record("comment", "from git archive")) + archives[0])
    for data in archives:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            expected = [(m.name, m.offset_data, m.size, m.isfile()) for m in tar]
        for source in (data, io.BytesIO(data)):
            got = [(m.name, m.offset_data, m.size, m.isfile()) for m in iter_tar(source, len(data))]
            assert got == expected
    assert [s.key for s in scan_shard(archives[0])] == [s.key for s in scan_shard(io.BytesIO(archives[0]),
                                                                                   len(archives[0]))]


@pytest.mark.parametrize("case", ["pax header of 3 MB", "GNU long name of 70 kB", "size past the end"])
def test_the_command_line_refuses_a_hostile_header_in_one_line(corpus, tmp_path, capsys, case):
    vid, name = "clean/onecrop", VARIANTS["clean/onecrop"]
    data = (corpus / name).read_bytes()
    first = offsets(data)[1][0]
    if case == "size past the end":
        header = bytearray(data[first:first + 512])
        header[124:136] = b"\x80" + (2 ** 62).to_bytes(11, "big")
        hostile = data[:first] + bytes(checksum(header)) + data[first + 512:]
        message = f"claims {2 ** 62} bytes, beyond the end of the shard"
    elif case == "pax header of 3 MB":
        hostile = data[:first] + extension(b"x", b"1" * BIG_PAX) + data[first:]
        message = f"an extension header of {BIG_PAX} bytes"
    else:
        hostile = data[:first] + extension(b"L", b"n" * 70_000, "././@LongLink") + data[first:]
        message = "an extension header of 70000 bytes"
    copy = tmp_path / "corpus"
    shutil.copytree(corpus, copy)
    plant(copy, json.loads((corpus / "manifest.json").read_text()), vid, hostile)
    commands = {"score": ["score", "--corpus", copy, "--model", "test_fuzz_tar:constant_model", "--out",
                          tmp_path / "r", "--workers", 0, "--only", vid],
                "pack": ["pack", copy, "--out", tmp_path / "packed"],
                "verify": ["verify", copy]}
    for what, command in commands.items():
        capsys.readouterr()
        assert main(["-q", *map(str, command)]) == (1 if what == "verify" else 2), what
        captured = capsys.readouterr()
        text = captured.out if what == "verify" else captured.err
        lines = [line for line in text.splitlines() if name in line]
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in captured.err, (what, text)
    train = tmp_path / "train"
    train.mkdir()
    (train / "part-000000.tar").write_bytes(hostile)
    with pytest.raises(DataError, match="no usable samples"):
        open_data(train)


def constant_model():
    import torch

    class Constant(torch.nn.Module):
        qrobust_normalizes_input = True

        def forward(self, x):
            return torch.zeros(x.shape[0], 3)

    return Constant()
