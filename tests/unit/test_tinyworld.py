"""The tiny world: deterministic scenes, answers that parse back, processor-equivalent pixels."""

import numpy as np
import pytest

from hivis_testbed.tinyworld import build, dataset, prompts
from hivis_testbed.tinyworld.batches import pixels, prompt_ids
from hivis_testbed.tinyworld.scenes import CELLS, blank_image, render


def test_samples_are_deterministic_and_splits_differ():
    a = dataset.sample("train", 5, 126)
    b = dataset.sample("train", 5, 126)
    assert a.scene == b.scene and a.qa == b.qa
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    scenes = {split: [dataset.sample(split, i, 126).scene for i in range(50)] for split in dataset.SPLITS}
    assert scenes["train"] != scenes["test"] and scenes["validation"] != scenes["test"]


def test_bad_split_and_kind_are_rejected():
    with pytest.raises(ValueError, match="unknown split"):
        dataset.sample("dev", 0, 126)
    with pytest.raises(ValueError, match="unknown prompt kind"):
        dataset.sample("train", 0, 126, kind="poem")


def test_description_parses_back_to_the_scene():
    for i in range(40):
        s = dataset.sample("test", i, 126, kind="describe")
        graded = prompts.grade_description(s.scene, s.qa.answer)
        assert all(all(v) for v in graded.values()), (s.qa.answer, graded)


def test_grading_catches_errors():
    s = dataset.sample("test", 3, 126, kind="describe")
    o = s.scene.objects[0]
    wrong = s.qa.answer.replace(f"{o.size} {o.colour} {o.shape}", f"{o.size} {o.colour} hexagon", 1)
    assert prompts.grade_description(s.scene, wrong)["shape"][0] is False
    assert not any(prompts.grade_description(s.scene, "I see nothing.")["count"])


def test_every_prompt_kind_appears_and_answers_are_image_dependent():
    kinds = {dataset.sample("train", i, 126).qa.kind for i in range(400)}
    assert kinds == set(prompts.KINDS)
    answers = {dataset.sample("test", i, 126, kind="describe").qa.answer for i in range(30)}
    assert len(answers) == 30


def test_grid_cells_are_whole_patches_and_objects_stay_in_their_cell():
    s = dataset.sample("test", 11, 126, kind="describe")
    img = np.asarray(render(s.scene, 126, np.random.default_rng(0)))
    bg = img[0, 0] if s.scene.at(0) is None else None
    cell = 126 // 3
    for c in range(9):
        r, k = divmod(c, 3)
        patch = img[r * cell:(r + 1) * cell, k * cell:(k + 1) * cell].reshape(-1, 3)
        colours = {tuple(p) for p in patch}
        if s.scene.at(c) is None and bg is not None:
            assert colours == {tuple(bg)}, CELLS[c]
    assert np.asarray(blank_image(126)).std() == 0


@pytest.fixture(scope="module")
def processor():
    tok = build.train_tokenizer(num_texts=400)
    return build.make_processor(tok, 126)


def test_training_inputs_match_the_processor(processor):
    """The fast training path (batches.py) builds exactly what LlavaProcessor builds."""
    s = dataset.sample("test", 2, 126, kind="describe")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.qa.question}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<s>USER: <image>\n")  # BOS first: server prompts equal offline prompts
    enc = processor(images=s.image, text=text, return_tensors="pt")
    ids = prompt_ids(processor.tokenizer, s.qa.question, 81)
    assert enc["input_ids"][0].tolist() == ids
    assert float((enc["pixel_values"] - pixels([s.image])).abs().max()) < 1e-5
