"""maskedclip.prompts: expert knowledge dictionary, FLAIR label->text, zero-shot prompts, sentence splitting."""

import random
from collections import Counter

import numpy as np
import pytest

from maskedclip.prompts import (
    EXPERT_KNOWLEDGE,
    PRETRAIN_TEMPLATE,
    ZERO_SHOT_TEMPLATE,
    FlairTextFn,
    class_prompts,
    descriptions,
    fill_template,
    label_to_text,
    labels_to_paired_records,
    sentence_spans,
    split_sentences,
)

SYNTHETIC_CLASSES = [
    "no DR",
    "mild DR",
    "moderate DR",
    "severe DR",
    "proliferative DR",
    "non-referable DR",
    "referable DR",
    "no glaucoma",
    "glaucoma",
    "normal",
    "diabetic retinopathy",
    "age-related macular degeneration",
    "cataract",
]

# DECISIONS.md §3.4: FLAIR's own descriptions, which must be used verbatim
FLAIR_ENTRIES = {
    "no DR": ["no diabetic retinopathy", "no microaneurysms"],
    "mild DR": ["only few microaneurysms"],
    "moderate DR": [
        "many exudates near the macula",
        "many haemorrhages near the macula",
        "retinal thickening near the macula",
        "hard exudates",
        "cotton wool spots",
        "few severe haemorrhages",
    ],
    "severe DR": ["venous beading", "many severe haemorrhages", "intraretinal microvascular abnormality"],
    "proliferative DR": ["preretinal or vitreous haemorrhage", "neovascularization"],
    "glaucoma": [
        "optic nerve abnormalities",
        "abnormal size of the optic cup",
        "anomalous size in the optic disc",
    ],
    "age-related macular degeneration": [
        "many small drusen",
        "few medium-sized drusen",
        "large drusen",
        "macular degeneration",
    ],
    "normal": ["healthy", "no findings", "no lesion signs", "no glaucoma", "no retinopathy"],
    "cataract": ["opacity in the macular area"],
    "pathologic myopia": ["anomalous disc, macular atrophy and possible tessellation"],
}


# ----------------------------------------------------------------------------------------------- dictionary
def test_every_class_has_descriptions():
    assert all(
        isinstance(v, list) and len(v) >= 1 and all(isinstance(d, str) and d.strip() == d and d for d in v)
        for v in EXPERT_KNOWLEDGE.values()
    )
    keys = [" ".join(k.lower().split()) for k in EXPERT_KNOWLEDGE]
    assert len(keys) == len(set(keys))


def test_flair_entries_verbatim():
    for k, v in FLAIR_ENTRIES.items():
        assert all(d in EXPERT_KNOWLEDGE[k] for d in v), k


def test_synthetic_and_adapter_labels_are_covered():
    from maskedclip.data import LABEL_SPACES

    classes = set(SYNTHETIC_CLASSES)
    for space in LABEL_SPACES.values():
        classes.update(space or ())
    missing = sorted(c for c in classes if not descriptions(c))
    assert not missing, missing


def test_descriptions_lookup():
    assert descriptions("Normal") == descriptions("  normal ") == EXPERT_KNOWLEDGE["normal"]
    assert descriptions("no such class") == []
    assert descriptions("x", knowledge={"X": ["y"]}) == ["y"]
    d = descriptions("glaucoma")
    d.append("mutated")
    assert "mutated" not in EXPERT_KNOWLEDGE["glaucoma"]  # a copy is returned


# ----------------------------------------------------------------------------------------------- label -> text
def test_fill_template():
    assert fill_template(PRETRAIN_TEMPLATE, "cataract") == "A fundus photograph of cataract"
    assert fill_template(PRETRAIN_TEMPLATE, "cataract", "noisy") == "A noisy fundus photograph of cataract"
    assert fill_template(ZERO_SHOT_TEMPLATE, "no DR") == "A fundus photograph of no DR"
    assert fill_template("[CLS]  and  [ATR]", "a") == "a and"


def test_label_to_text_samples_name_or_description():
    options = ["mild DR"] + EXPERT_KNOWLEDGE["mild DR"]
    texts = Counter(label_to_text("mild DR", random.Random(s)) for s in range(600))
    assert set(texts) == {f"A fundus photograph of {o}" for o in options}
    assert all(120 < n < 280 for n in texts.values())  # uniform over 3 options: 200 each
    assert label_to_text("mild DR", augment=False) == "A fundus photograph of mild DR"
    assert label_to_text("unknown finding", 1) == "A fundus photograph of unknown finding"


def test_label_to_text_deterministic_for_a_seed():
    a = [label_to_text("moderate DR", r) for r in [random.Random(7)] * 1 for _ in range(20)]
    b = [label_to_text("moderate DR", r) for r in [random.Random(7)] * 1 for _ in range(20)]
    assert a == b and len(set(a)) > 2
    rng1, rng2 = np.random.default_rng(5), np.random.default_rng(5)
    assert [label_to_text("glaucoma", rng1) for _ in range(10)] == [
        label_to_text("glaucoma", rng2) for _ in range(10)
    ]
    assert label_to_text("glaucoma", 3) == label_to_text("glaucoma", random.Random(3))
    with pytest.raises(TypeError):
        label_to_text("glaucoma", "seed")
    with pytest.raises(ValueError):
        label_to_text("", 0)


def test_label_list_samples_one_category():
    outs = {label_to_text(["cataract", "glaucoma"], random.Random(s), augment=False) for s in range(50)}
    assert outs == {"A fundus photograph of cataract", "A fundus photograph of glaucoma"}


def test_labels_to_paired_records():
    recs = [
        dict(id="e1", image="a.png", label="proliferative DR", source="eyepacs"),
        dict(id="o1", image="b.png", text="cataract, lens dust", labels=["cataract", "lens dust"]),
        dict(id="m1", image="c.png", labels=["glaucoma", "cataract"]),
    ]
    out = labels_to_paired_records(recs, rng=random.Random(0))
    assert out[0]["label"] == "proliferative DR" and out[0]["source"] == "eyepacs"
    assert out[0]["text"] in {
        f"A fundus photograph of {o}" for o in ["proliferative DR"] + EXPERT_KNOWLEDGE["proliferative DR"]
    }
    assert out[1] == recs[1]  # existing text kept
    assert out[2]["label"] in ("glaucoma", "cataract")  # sampled category becomes the label (D8)
    assert out[2]["text"] in {
        f"A fundus photograph of {o}" for o in [out[2]["label"]] + EXPERT_KNOWLEDGE[out[2]["label"]]
    }
    assert "text" not in recs[0]  # inputs not modified
    assert out == labels_to_paired_records(recs, rng=random.Random(0))  # deterministic for a seed
    over = labels_to_paired_records(recs, rng=0, augment=False, overwrite=True)
    assert over[1]["text"] in ("A fundus photograph of cataract", "A fundus photograph of lens dust")
    with pytest.raises(ValueError, match="'x'"):
        labels_to_paired_records([dict(id="x", image="d.png")])


def test_flair_text_fn():
    fn = FlairTextFn()
    assert fn(dict(id="a", text="a report", label=None), random.Random(0)) == ("a report", None)
    text, label = fn(dict(id="b", label="referable glaucoma"), random.Random(0))
    assert label == "referable glaucoma" and text.startswith("A fundus photograph of ")
    assert fn(dict(id="c"), random.Random(0)) == (None, None)
    assert FlairTextFn(use_existing_text=False, augment=False)(
        dict(id="d", text="t", label="cataract"), 0
    ) == ("A fundus photograph of cataract", "cataract")
    import pickle

    pickle.dumps(fn)  # usable in DataLoader workers


# ----------------------------------------------------------------------------------------------- zero-shot prompts
def test_class_prompts():
    p = class_prompts(["cataract", "no DR", "brand new class"])
    assert p["cataract"] == [
        "A fundus photograph of opacity in the macular area",
        "A fundus photograph of cataract",
    ]
    assert p["no DR"] == [
        "A fundus photograph of no diabetic retinopathy",
        "A fundus photograph of no microaneurysms",
        "A fundus photograph of no DR",
    ]
    assert p["brand new class"] == ["A fundus photograph of brand new class"]
    assert class_prompts(["no DR"], domain_knowledge=False) == {"no DR": ["A fundus photograph of no DR"]}
    p = class_prompts(["no referable glaucoma"])["no referable glaucoma"]
    assert len(p) == len(set(p)) == 4


# ----------------------------------------------------------------------------------------------- sentences
@pytest.mark.parametrize(
    "report, sentences",
    [
        ("Cup-to-disc ratio 0.7. No haemorrhages!", ["Cup-to-disc ratio 0.7.", "No haemorrhages!"]),
        (
            "Drusen, e.g. small ones; approx. 3 lesions.\nNormal disc",
            ["Drusen, e.g. small ones;", "approx. 3 lesions.", "Normal disc"],
        ),
        (
            "CDR of 0.45 in OD vs. 0.5 in OS. Follow-up in 6 months?",
            ["CDR of 0.45 in OD vs. 0.5 in OS.", "Follow-up in 6 months?"],
        ),
        (
            "Findings consistent with DR. Macula (i.e. fovea) flat.",
            ["Findings consistent with DR.", "Macula (i.e. fovea) flat."],
        ),
        ('Is it "moderate DR?" Yes... CDR .5 today', ['Is it "moderate DR?"', "Yes...", "CDR .5 today"]),
        (
            "Exudates 1.5 mm from the fovea.2 lesions",
            ["Exudates 1.5 mm from the fovea.2 lesions"],
        ),  # no space: not a boundary
        ("  Line one\r\nLine two\n\n\n. ; ok.  ", ["Line one", "Line two"]),
        ("", []),
        ("No.", []),  # too short (2 letters)
    ],
)
def test_split_sentences(report, sentences):
    assert split_sentences(report) == sentences


def test_sentence_spans_are_character_spans():
    rep = "Optic disc normal. CDR 0.4!\nNo exudates; e.g. none seen."
    spans = sentence_spans(rep)
    assert spans == [(0, 18), (19, 27), (28, 40), (41, 56)] and len(rep) == 56
    assert (
        [rep[s:e] for s, e in spans]
        == split_sentences(rep)
        == ["Optic disc normal.", "CDR 0.4!", "No exudates;", "e.g. none seen."]
    )
    assert all(e1 <= s2 for (_, e1), (s2, _) in zip(spans, spans[1:]))
    assert split_sentences("Ok. Fine.", min_chars=2) == ["Ok.", "Fine."] and split_sentences("Ok. Fine.") == [
        "Fine."
    ]
    with pytest.raises(TypeError):
        sentence_spans(None)
