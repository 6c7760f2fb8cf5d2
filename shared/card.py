"""The dataset card: ``README.md`` at the root of a corpus, so Hugging Face ``datasets`` loads any variant
by name, with its labels as class names::

    datasets.load_dataset("corpora/robustmq", "natural--fog-3", split="train")

The card's YAML front matter holds one ``configs`` entry per variant (its shards,
``<family>/<name>/*.tar``) and, under ``dataset_info``, the features of each:
``__key__`` (the sample key), the payload (``jpg``/``png`` as an image, ``mp4``/``mkv``
as a video) and ``cls`` as a ``ClassLabel`` of the corpus's classes (written once, as a
YAML anchor, however many variants). The body says what the corpus is, how to load a
variant and whose terms the images carry.

:func:`build_card` makes the text from the manifest alone (never from the clock, the
machine or the card entry itself), so a corpus has one card, byte for byte;
:func:`write_card` writes it atomically and records its size and sha256 in the
manifest (``card``), which ``qrobust verify`` checks. ``generate``, ``import`` and
``pack`` all write it through :func:`write_card`.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from qrobust.shared.files import write_atomic

CARD_NAME = "README.md"
IMAGE_MEMBERS = ("jpg", "png")
VIDEO_MEMBERS = ("mp4", "mkv")


def config_name(variant_id: str) -> str:
    """The ``datasets`` config name of a variant: its id with ``/`` written ``--`` (``natural/fog-3`` ->
    ``natural--fog-3``).

    ``datasets`` refuses ``< > : / \\ | ? *`` in a config name (it names a cache folder). A variant id
    holds letters, digits and ``_``, then ``/``, then a name that may also hold ``. + -``: the ``/`` is
    the one character to map. A family name has no ``-``, so the first ``--`` of a config name is
    always the ``/`` (:func:`variant_of` maps it back) and no two variants share a config name.
    """
    return variant_id.replace("/", "--", 1)


def variant_of(config: str) -> str:
    """The variant id of a config name (the inverse of :func:`config_name`)."""
    return config.replace("--", "/", 1)


def payload_member(entry: dict) -> str | None:
    """The payload member type of a manifest variant entry (``jpg``, ``png``, ``mp4``, ``mkv``), or None
    when its encoding names none of these."""
    encoding = entry.get("encoding") if isinstance(entry.get("encoding"), dict) else {}
    ext = encoding.get("ext") or encoding.get("format")  # sequences record their recipe's ext
    return ext if ext in IMAGE_MEMBERS + VIDEO_MEMBERS else None


def _q(text) -> str:
    """``text`` as a YAML double-quoted scalar in ASCII: what any YAML (or JSON) reader reads back as is."""
    out = []
    for ch in str(text):
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return '"' + "".join(out) + '"'


def _md(text) -> str:
    """Free text (a suite or release name) for the Markdown body, on one line in ASCII: letters, digits and
    plain punctuation as they are, anything else as a numeric character reference."""
    return "".join(ch if ch.isascii() and (ch.isalnum() or ch in " -.,:;/+()='!?") else f"&#{ord(ch)};"
                   for ch in " ".join(str(text).split()))


def _front_matter(manifest: dict) -> list[str]:
    variants = sorted(manifest["variants"].items())
    classes = manifest.get("classes") or []
    lines = ["---", f"pretty_name: {_q(_title(manifest))}", "tags:", "- qrobust", "- webdataset", "- robustness",
             "task_categories:", "- image-classification", "configs:"]
    for vid, _ in variants:
        lines += [f"- config_name: {_q(config_name(vid))}", "  data_files:", "  - split: train",
                  f"    path: {_q(vid + '/*.tar')}"]
    infos = [(vid, member) for vid, entry in variants if (member := payload_member(entry))]
    if infos:
        lines.append("dataset_info:")
    anchored = False
    for vid, member in infos:
        lines += [f"- config_name: {_q(config_name(vid))}", "  features:",
                  "  - name: __key__", "    dtype: string",
                  f"  - name: {member}", f"    dtype: {'image' if member in IMAGE_MEMBERS else 'video'}",
                  "  - name: cls"]
        if not classes:
            lines.append("    dtype: int64")
        elif anchored:
            lines += ["    dtype:", "      class_label:", "        names: *classes"]
        else:
            lines += ["    dtype:", "      class_label:", "        names: &classes"]
            lines += [f"          '{i}': {_q(name)}" for i, name in enumerate(classes)]
            anchored = True
    return lines + ["---"]


def _title(manifest: dict) -> str:
    return f"qrobust corpus {(manifest.get('suite') or {}).get('name', '')}".strip()


def _how_made(manifest: dict) -> str:
    suite = (manifest.get("suite") or {}).get("name", "")
    imported = manifest.get("imported_from")
    if isinstance(imported, dict):
        made = (f"imported by `qrobust import` from the released {_md(imported.get('kind'))} files, whose bytes the "
                "shards hold unchanged")
    else:
        made = f"rendered by `qrobust generate` (suite {_md(suite)}) from a folder of source images"
    if "packed_from" in manifest:
        made += ", then cut to this subset by `qrobust pack`"
    return made


def _body(manifest: dict) -> list[str]:
    variants = sorted(manifest["variants"].items())
    members = {vid: payload_member(entry) for vid, entry in variants}
    families: dict[str, int] = {}
    for vid, _ in variants:
        families[vid.split("/")[0]] = families.get(vid.split("/")[0], 0) + 1
    count, n_classes = manifest["samples"]["count"], len(manifest.get("classes") or [])
    example = next((vid for vid, m in members.items() if m in IMAGE_MEMBERS), None) or variants[0][0]
    video = [vid for vid, m in members.items() if m in VIDEO_MEMBERS]
    lines = [
        "", f"# {_md(_title(manifest))}", "",
        f"{count} images of {n_classes} classes, each in {len(variants)} variants "
        f"({', '.join(f'{family} {n}' for family, n in sorted(families.items()))}), as WebDataset shards: "
        f"{_how_made(manifest)}. Every variant holds the same samples, in the same order (by key). A sample is "
        "`<key>.cls`, its class index as text, and one payload: an image (`.jpg`, `.png`) or, for a sequence, "
        "a video (`.mp4`, `.mkv`). `manifest.json` records how the corpus was made and the sha256 of every "
        "shard and of this card; `qrobust verify` checks them, `qrobust score` scores a model on the corpus.",
        "", "## Loading a variant with Hugging Face datasets", "",
        "One config per variant, named by the variant id with `/` written `--` (`natural/fog-3` is "
        "`natural--fog-3`). A config's one split is called `train`, the name `datasets` gives the split of a "
        "folder; the samples are evaluation data, in shard order. `cls` is a `ClassLabel` of the corpus's "
        "classes and `__key__` the sample key, the same in every variant.", "",
        "```python", "from datasets import load_dataset", "",
        f"ds = load_dataset(\"path/to/this/corpus\", \"{config_name(example)}\", split=\"train\")",
        "ds.features[\"cls\"].names  # the class names", "```", "",
    ]
    if video:
        vmember = members[video[0]]
        lines += [
            f"Sequences load as `datasets.Video` columns (`{config_name(video[0])}`): decoding a video needs "
            "`torchcodec` and the FFmpeg libraries; without them, "
            f"`ds.cast_column(\"{vmember}\", datasets.Video(decode=False))` gives each video's bytes.", ""]
    if any(m is None for m in members.values()):
        lines += ["Variants whose payload is none of these types have no declared features: `datasets` infers "
                  "them, and `cls` is then the bare class index.", ""]
    lines += ["## Variants", "", "| config | variant | samples | payload |", "|---|---|---|---|"]
    lines += [f"| `{config_name(vid)}` | `{vid}` | {entry['count']} | {members[vid] or '-'} |"
              for vid, entry in variants]
    lines += [
        "", "## Licence", "",
        "The images are the source dataset's, altered by noise: they remain under the source's terms (for a "
        "corpus made from ImageNet, its terms of access: non-commercial research and education). Holding or "
        "sharing this corpus is subject to those terms; qrobust's licence covers its code, not these images.",
    ]
    return lines


def build_card(manifest: dict) -> str:
    """The card of a corpus, from its manifest's suite, classes, sample count and variants (their ids and
    encodings) and whether it was imported or packed: the same manifest gives the same bytes."""
    return "\n".join(_front_matter(manifest) + _body(manifest)) + "\n"


def card_record(text: str) -> dict:
    """The manifest's ``card`` entry for a card's text: its name, byte size and sha256."""
    data = text.encode("utf-8")
    return {"name": CARD_NAME, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_card(corpus: str | Path, manifest: dict) -> dict:
    """Write the card of ``manifest`` to ``<corpus>/README.md`` (atomically), record it as the manifest's
    ``card`` entry, and return that entry. Call it before the manifest is written."""
    text = build_card(manifest)
    write_atomic(Path(corpus) / CARD_NAME, text)
    manifest["card"] = card_record(text)
    return manifest["card"]
