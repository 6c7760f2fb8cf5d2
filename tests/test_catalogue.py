"""One definition per pluggable item: the catalogue, the generator's implementations, the packaged suites, the
report's labels and the training recipes agree, and a sequence's noise flag travels in the manifest."""
from __future__ import annotations


from helpers import small_corpus
from qrobust.shared import noises
from qrobust.shared.suites import load_suite, packaged_suites


def test_the_generator_implements_exactly_the_catalogue():
    from qrobust.generate import natural, sequences, systematic

    assert natural.CORRUPTIONS.names() == noises.CORRUPTIONS.names()  # the 15 and the 4 held-out ones
    assert sequences.PERTURBATIONS.names() == sorted(noises.SEQUENCE_PERTURBATIONS)
    assert systematic.DECODERS.names() == sorted(noises.SYSTEMATIC_DECODERS)
    assert systematic.RESIZES.names() == sorted(noises.SYSTEMATIC_RESIZES)


def test_packaged_suites_use_catalogue_names_and_robustmq_is_the_benchmark():
    from qrobust.score.metrics import ALEXNET_ERR

    for name in packaged_suites():
        for v in load_suite(name).variants:
            p = v.params
            assert (p.get("corruption") or p.get("perturbation") or v.family) in \
                {*noises.CORRUPTIONS, *noises.PERTURBATIONS, "clean", "systematic"}, v.id
            if v.family == "systematic":
                assert v.name in noises.SYSTEMATIC
            if v.family == "sequence":
                definition = noises.PERTURBATIONS.get(p["perturbation"])
                assert (p["frames"], p["noise"]) == (definition.frames, definition.noise)
    robustmq = load_suite("robustmq")
    assert [v.params["corruption"] for v in robustmq.variants if v.family == "natural"][::5] == \
        list(noises.BENCHMARK_CORRUPTIONS)
    assert [v.name for v in robustmq.variants if v.family == "sequence"] == list(noises.SEQUENCE_PERTURBATIONS)
    assert [v.name for v in robustmq.variants if v.family == "systematic"] == list(noises.SYSTEMATIC_VARIANTS)
    assert list(ALEXNET_ERR) == list(noises.BENCHMARK_CORRUPTIONS)  # mCE's baseline covers the same 15


def test_report_labels_and_recipes_read_the_definitions():
    from qrobust.score.tables import ARCHS, HUES, METHODS, _label
    from qrobust.shared.architectures import ARCHITECTURES
    from qrobust.shared.quant import METHODS as QUANT
    from qrobust.train.recipes import qat_recipe

    assert _label("impulse_noise") == noises.CORRUPTIONS.get("impulse_noise").label == "Impulse"
    assert _label("resize-opencv-area") == "OpenCV area"
    assert list(METHODS)[1:] == QUANT.in_order() and all(HUES[m] == QUANT.get(m).hue for m in QUANT)
    assert all(ARCHS[a] == ARCHITECTURES.get(a).label for a in ARCHITECTURES)
    assert list(ARCHS)[:4] == ["resnet18", "resnet50", "regnetx_600mf", "mobilenet_v2"]  # the paper's order
    mobilenet = ARCHITECTURES.get("mobilenet_v2")
    assert (qat_recipe("mobilenet_v2", 4).lr, qat_recipe("mobilenet_v2", 4).weight_decay) == \
        (mobilenet.qat_lr, mobilenet.qat_weight_decay) == (0.01, 1e-5)
    assert qat_recipe("resnet50", 4).batch_size == ARCHITECTURES.get("resnet50").qat_batch_size == 256
    assert qat_recipe("tiny_cnn", 4).optimizer == "adam"  # a tiny architecture: the demo's recipe


def test_the_noise_flag_is_in_the_manifest_and_corpora_without_it_still_verify(tmp_path):
    from qrobust.shared.manifest import load_manifest, manifest_problems

    corpus = small_corpus(tmp_path, "sequence/*")
    manifest = load_manifest(corpus)
    assert {v: e["params"]["noise"] for v, e in manifest["variants"].items()} == \
        {"sequence/gaussian_noise": True, "sequence/rotate": False}
    for entry in manifest["variants"].values():  # as a corpus written before the flag was recorded
        del entry["params"]["noise"]
    assert manifest_problems(manifest) == []
    entry = manifest["variants"]["sequence/rotate"]
    entry["params"]["noise"] = True  # a flag that contradicts the suite is an edit
    assert any("params differ" in p for _, p in manifest_problems(manifest))
