"""vlmeff.eval.metrics against values worked out by hand from each reference's definition (vqaEval.py, LLaVA's
m4c_evaluator.py / eval_pope.py / eval_science_qa.py, MME's calculation.py, lmms-eval's gqa and mmbench static)."""
import pytest

from vlmeff.eval.metrics import (
    MME_COGNITION, MME_PERCEPTION, TASKS, exact_match, gqa_match, mmbench_accuracy, mmbench_option, mme_parse,
    mme_scores, pope_by_category, pope_metrics, pope_parse, score, scienceqa_accuracy, scienceqa_option,
    textvqa_accuracy, textvqa_normalize, vqa_accuracy, vqa_normalize,
)


# ---- VQA normalisation (vqaEval.py) ----

@pytest.mark.parametrize("text, normalized", [
    ("Two dogs.", "2 dogs"),          # number word, period removed
    ("The one", "1"),                 # article dropped, then number
    ("none", "0"),
    ("A Cat", "cat"),
    ("yes\n", "yes"),                 # newline to space, then stripped
    ("\tTwo", "2"),
    ("dont", "don't"),                # contractions table
    ("whats", "what's"),
    ("somebody'd", "somebodyd"),      # the table maps this one backwards
    ("Im", "im"),                     # its "Im" key is looked up after lowercasing: never found
    ("don't", "don't"),               # the apostrophe is no punctuation mark
    ("12:30", "12:30"),               # nor is the colon
])
def test_vqa_normalize_numbers_articles_contractions(text, normalized):
    assert vqa_normalize(text) == normalized


@pytest.mark.parametrize("text, normalized", [
    ("1,000", "1000"),                      # digit-comma-digit: the comma is deleted
    ("red,blue", "red blue"),               # a mark touching no space becomes a space
    ("red, blue", "red blue"),              # a mark touching a space is deleted
    ("well-known", "well known"),
    ("1,000 well-known", "1000 wellknown"), # a digit-comma-digit anywhere deletes every mark, the hyphen too
    ("yes!", "yes"),
    ("(B)", "b"),
])
def test_vqa_normalize_punctuation(text, normalized):
    assert vqa_normalize(text) == normalized


@pytest.mark.parametrize("text, normalized", [
    ("3.", "3"),       # periodStrip's (?!<=\d) is a lookahead, so a period after a digit goes too; the intended
                       # lookbehind would have kept "3."
    ("3.5", "3.5"),    # a period before a digit stays
    (".5", ".5"),
    ("a.b", "ab"),     # removed, not turned into a space
])
def test_vqa_normalize_period_strip_quirk(text, normalized):
    assert vqa_normalize(text) == normalized


def test_vqa_normalize_removes_only_the_first_32_lone_periods():
    # re.UNICODE (32) is passed as periodStrip.sub's count: the 33rd period survives
    assert vqa_normalize("." * 33) == "."
    assert vqa_normalize("." * 32) == ""


# ---- VQA accuracy: the mean over the 10 leave-one-out subsets of min(1, matches / 3) ----

@pytest.mark.parametrize("matches, accuracy", [
    (0, 0.0),
    (1, 0.3),    # leaving the match out: 0; each of the 9 others: 1/3 -> 9 * 1/3 / 10
    (2, 0.6),    # 2 * 1/3 + 8 * 2/3 = 6, / 10
    (3, 0.9),    # 3 * 2/3 + 7 * 1 = 9, / 10
    (4, 1.0),    # 3 others always match
    (10, 1.0),
])
def test_vqa_accuracy_leave_one_out(matches, accuracy):
    answers = ["2"] * matches + ["3"] * (10 - matches)
    assert vqa_accuracy("Two.", answers) == pytest.approx(accuracy)


def test_vqa_accuracy_compares_whole_answers():
    # "Two dogs." normalises to "2 dogs", which is not "2": extra words are not forgiven
    assert vqa_accuracy("Two dogs.", ["2"] * 3 + ["3"] * 7) == 0.0
    assert vqa_accuracy("Two dogs.", ["2 dogs"] * 3 + ["3"] * 7) == pytest.approx(0.9)


def test_vqa_accuracy_cleans_the_answers_only_when_they_differ():
    # ten equal answers are taken as they are; "red, blue" never equals the prediction's "red blue"
    assert vqa_accuracy("red, blue", ["red, blue"] * 10) == 0.0
    # one other answer, and all of them go through the punctuation step: 9 "red blue" match
    assert vqa_accuracy("red, blue", ["red, blue"] * 9 + ["red"]) == 1.0
    # and only the punctuation step: an answer "Stop" is not lowercased
    assert vqa_accuracy("stop", ["Stop"] * 10) == 0.0


def test_vqa_accuracy_needs_answers():
    with pytest.raises(ValueError, match="at least one ground-truth answer"):
        vqa_accuracy("yes", [])


# ---- TextVQA (m4c_evaluator.py EvalAIAnswerProcessor on the prediction and on every answer) ----

def test_textvqa_normalize():
    # lowercased, "?" deleted, "'s" split off, article dropped
    assert textvqa_normalize("The man's SIGN?") == "man 's sign"
    assert textvqa_normalize("1,000") == "1000"
    assert textvqa_normalize("red,blue") == "redblue"   # the comma is deleted before the punctuation step


def test_textvqa_accuracy_normalises_the_answers_too():
    assert textvqa_accuracy("stop", ["Stop"] * 10) == 1.0
    assert textvqa_accuracy("STOP?", ["stop"] * 3 + ["go"] * 7) == pytest.approx(0.9)
    assert textvqa_accuracy("Stop sign", ["stop"] * 10) == 0.0


# ---- exact match: easyvqa / scenes, and GQA as lmms-eval scores it ----

def test_exact_match_strips_and_lowercases_only():
    assert exact_match(" Circle ", "circle") == 1.0
    assert exact_match("circle.", "circle") == 0.0


@pytest.mark.parametrize("prediction, answer, right", [
    ("Yes.", "yes", 1.0),            # case and punctuation ignored
    (" left-hand ", "lefthand", 1.0),  # the prediction is stripped; the hyphen deleted
    ("the cat", "cat", 0.0),         # no article removal
    ("red  car", "red car", 0.0),    # inner whitespace is not collapsed
    ("no", "yes", 0.0),
])
def test_gqa_match(prediction, answer, right):
    assert gqa_match(prediction, answer) == right


# ---- POPE (eval_pope.py) ----

@pytest.mark.parametrize("answer, read", [
    ("Yes, there is a dog.", "yes"),
    ("No, there is not.", "no"),
    ("There is no dog in the image.", "no"),
    ("Yes. There is no cat.", "yes"),   # only the first sentence counts
    ("no\n", "no"),                     # stripped first
    ("Not really", "yes"),              # "Not" is not one of the words No / no / not
    ("NO", "yes"),
    ("There isn't", "yes"),
    ("yes,no", "yes"),                  # commas deleted: one word "yesno"
    ("Yes\nno", "yes"),                 # words are split on spaces only
])
def test_pope_parse(answer, read):
    assert pope_parse(answer) == read


def test_pope_metrics_on_a_worked_list():
    predictions = ["Yes", "No", "Yes, it is.", "There is no cat.", "yes", "no", "Yes"]
    labels = ["yes", "yes", "no", "no", "yes", "no", "No"]
    # read: yes no yes no yes no yes -> TP 2 (0, 4), FN 1 (1), FP 2 (2, 6), TN 2 (3, 5)
    m = pope_metrics(predictions, labels)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 2, 2, 1)
    assert m["accuracy"] == pytest.approx(4 / 7)
    assert m["precision"] == pytest.approx(2 / 4)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3))   # 4/7
    assert m["yes_ratio"] == pytest.approx(4 / 7)   # of the predictions; 3/7 of the labels are "yes"


def test_pope_metrics_without_a_yes_prediction_are_zero_not_an_error():
    m = pope_metrics(["no", "no"], ["yes", "no"])
    assert (m["precision"], m["recall"], m["f1"], m["accuracy"], m["yes_ratio"]) == (0.0, 0.0, 0.0, 0.5, 0.0)


def test_pope_metrics_rejects_bad_labels_and_lengths():
    with pytest.raises(ValueError, match="'maybe'"):
        pope_metrics(["yes"], ["maybe"])
    with pytest.raises(ValueError, match="2 predictions and 1 labels"):
        pope_metrics(["yes", "no"], ["yes"])


def test_pope_by_category_scores_each_then_averages():
    predictions = ["yes", "no", "yes", "yes"]
    labels = ["yes", "no", "yes", "no"]
    categories = ["random", "random", "adversarial", "adversarial"]
    out = pope_by_category(predictions, labels, categories)
    random, adversarial = out["categories"]["random"], out["categories"]["adversarial"]
    assert (random["accuracy"], random["f1"], random["yes_ratio"]) == (1.0, 1.0, 0.5)
    # adversarial: TP 1, FP 1 -> P 1/2, R 1, F1 2/3
    assert (adversarial["precision"], adversarial["recall"], adversarial["yes_ratio"]) == (0.5, 1.0, 1.0)
    assert adversarial["f1"] == pytest.approx(2 / 3)
    assert out["mean"]["f1"] == pytest.approx(5 / 6)
    assert out["mean"]["accuracy"] == pytest.approx(0.75)
    assert out["mean"]["recall"] == 1.0
    # the pooled F1 of the same 4 answers is another number: TP 2, FP 1, FN 0 -> 4/5
    assert pope_metrics(predictions, labels)["f1"] == pytest.approx(0.8)


# ---- MME (calculation.py) ----

@pytest.mark.parametrize("answer, read", [
    ("Yes", "yes"),
    ("no", "no"),
    ("No, there are two.", "no"),
    ("Not sure", "no"),        # "no" within the first 4 characters
    ("None of them", "no"),
    ("There are two", "other"),
    ("I think yes", "other"),  # "yes" is past the first 4 characters
    ("So no.", "other"),       # so is "no"
    (" yes", "yes"),           # stripped first
])
def test_mme_parse(answer, read):
    assert mme_parse(answer) == read


def test_mme_scores_on_a_worked_table():
    rows = [  # prediction, answer, subtask, image
        ("Yes", "yes", "count", "c1.jpg"),                  # right
        ("No, there are two.", "no", "count", "c1.jpg"),    # right: c1 has both right
        ("There are two", "yes", "count", "c2.jpg"),        # "other": wrong
        ("no", "no", "count", "c2.jpg"),                    # right
        ("Yes.", "Yes", "OCR", "o1.jpg"),                   # right
        ("Not sure", "No", "OCR", "o1.jpg"),                # read as "no": right
        ("yes", "yes", "code_reasoning", "k1.png"),         # right
        ("yes", "no", "code_reasoning", "k1.png"),          # wrong
    ]
    out = mme_scores(*zip(*rows))
    # count: acc 3/4 -> 75, acc+ 1/2 images -> 50; OCR: 100 + 100; code_reasoning: 50 + 0
    assert out["subtasks"]["count"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0}
    assert out["subtasks"]["OCR"] == {"acc": 100.0, "acc_plus": 100.0, "score": 200.0}
    assert out["subtasks"]["code_reasoning"] == {"acc": 50.0, "acc_plus": 0.0, "score": 50.0}
    assert out["perception"] == 325.0
    assert out["cognition"] == 50.0


def test_mme_subtasks_are_the_reference_ones():
    assert len(MME_PERCEPTION) == 10 and len(MME_COGNITION) == 4
    assert {"existence", "count", "position", "color", "OCR"} <= set(MME_PERCEPTION)
    assert "numerical_calculation" in MME_COGNITION


def test_mme_scores_rejects_unpaired_images_and_unknown_subtasks():
    with pytest.raises(ValueError, match="two questions per image"):
        mme_scores(["yes", "no", "yes"], ["yes", "no", "yes"], ["count"] * 3, ["a", "a", "b"])
    with pytest.raises(ValueError, match="unknown MME subtask 'ocr'"):
        mme_scores(["yes", "no"], ["yes", "no"], ["ocr"] * 2, ["a", "a"])


# ---- ScienceQA (eval_science_qa.py) ----

@pytest.mark.parametrize("prediction, num_choices, letter", [
    ("B", 3, "B"),
    ("B. sphere", 3, "B"),
    ("The answer is C.", 3, "C"),
    ("B.", 3, None),                    # a letter and a period but no space after: not read
    ("(B)", 3, None),
    ("b", 3, None),                     # case-sensitive
    ("The answer is C", 3, None),       # the pattern wants one more character after the letter
    ("The answer is Blue.", 3, "B"),    # ... any character
    ("The answer is A. The answer is B.", 3, None),   # two readings: none
    ("E", 3, None),                     # not one of the question's letters
    ("D", 4, "D"),
])
def test_scienceqa_option(prediction, num_choices, letter):
    assert scienceqa_option(prediction, num_choices) == letter


def test_scienceqa_accuracy():
    predictions = ["A", "B. a fern", "The answer is A.", "(A)"]
    # right, right, wrong (answer B), unread
    assert scienceqa_accuracy(predictions, [0, 1, 1, 0], [2, 3, 2, 2]) == 0.5


# ---- MMBench (lmms-eval mmbench_en_dev_static) ----

OPTIONS = {"A": "cat", "B": "dog", "C": "red car", "D": "blue"}


@pytest.mark.parametrize("prediction, letter", [
    ("B", "B"),
    ("B.", "B"),                       # wrapped forms
    ("(C)", "C"),
    ("D)", "D"),
    ("The answer is B", "B"),          # the one letter standing alone
    ("The answer is B.", "B"),
    ("A", "A"),
    ("A cat", "A"),                    # "A" alone among 2 words is a letter ...
    ("A big dog", "A"),                # ... and among 3
    ("A dog is on the left", "B"),     # ... among more than 3 it may be the article: read by option text instead
    ("It is a dog", "B"),              # the one option text in the answer
    ("(C) is right, not B", "B"),      # a lone letter is tried before the wrapped forms
    ("cat or dog", None),              # two option texts, no letter anywhere
    ("Answer:B", "B"),                 # fallback (extract_mcq_answer): a letter ending the text
    ("Pick:C.Done", "C"),              # fallback: "C." in the text
    ("Choice:B.Maybe:A", "A"),         # fallback: the ending letter outranks "B."
    ("B or C", "B"),                   # fallback: the opening letter outranks the ending one
    ("so B.or C:maybe", "B"),          # fallback: "B." outranks the later "C:"
    ("see B)x so the answer is:Cy", "C"),   # fallback: a letter after an answer phrase outranks "B)"
    ('"C" is it, not Boat', "C"),      # fallback: the quote is stripped, so C opens the text
    ("Boat", "B"),                     # fallback, nothing else found: any letter, even inside a word
])
def test_mmbench_option(prediction, letter):
    assert mmbench_option(prediction, OPTIONS) == letter


def test_mmbench_option_matches_option_texts_ignoring_case():
    assert mmbench_option("It is the eiffel tower.", {"A": "Big Ben", "B": "Eiffel Tower"}) == "B"


def test_mmbench_circular_accuracy_needs_every_shift_right():
    indices = [0, 1_000_000, 2_000_000, 1, 1_000_001, 2, 3_000_005]
    answers = ["A", "B", "C", "A", "B", "C", "A"]
    predictions = ["A", "B", "C", "A", "C", "C", "B"]
    options = [OPTIONS] * 7
    # question 0: its 3 rows right; question 1: one shift wrong; question 2: right; 3_000_005 has no unshifted row
    assert mmbench_accuracy(predictions, answers, options, indices) == pytest.approx(2 / 3)
    # without indices, each row on its own: 5 of 7
    assert mmbench_accuracy(predictions, answers, options) == pytest.approx(5 / 7)


# ---- dispatcher ----

def test_score_names_the_task_set():
    assert TASKS == ("easyvqa", "scenes", "vqav2", "textvqa", "gqa", "pope", "mme", "scienceqa_img", "mmbench")


def test_score_rejects_an_unknown_task_naming_the_accepted_ones():
    with pytest.raises(ValueError, match=r"unknown task 'vqa3'.*easyvqa, scenes, vqav2, .*mmbench"):
        score("vqa3", ["a"], ["a"])


def test_score_rejects_mismatched_or_empty_inputs():
    with pytest.raises(ValueError, match="2 predictions and 1 references"):
        score("easyvqa", ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one prediction"):
        score("gqa", [], [])


def test_score_accuracy_tasks():
    assert score("easyvqa", ["Circle ", "red"], ["circle", "blue"]) == {"accuracy": 0.5}
    assert score("scenes", ["Beach"], ["beach"]) == {"accuracy": 1.0}
    assert score("gqa", ["Left.", "no"], ["left", "yes"]) == {"accuracy": 0.5}
    vqa = score("vqav2", ["Two.", "yes"], [["2"] * 3 + ["3"] * 7, ["no"] * 10])
    assert vqa["accuracy"] == pytest.approx((0.9 + 0.0) / 2)
    assert score("textvqa", ["STOP"], [["stop"] * 10]) == {"accuracy": 1.0}
    sqa = score("scienceqa_img", ["B", "A"], [{"answer": 1, "choices": ["x", "y"]},
                                            {"answer": 1, "choices": ["x", "y"]}])
    assert sqa == {"accuracy": 0.5}
    mmb = score("mmbench", ["A", "B", "B"], [{"answer": "A", "options": OPTIONS, "index": 0},
                                           {"answer": "B", "options": OPTIONS, "index": 1_000_000},
                                           {"answer": "A", "options": OPTIONS, "index": 1}])
    assert mmb == {"accuracy": 0.5}


def test_score_pope_and_mme():
    refs = [{"answer": "yes", "category": "random"}, {"answer": "no", "category": "popular"}]
    pope = score("pope", ["Yes", "Yes"], refs)
    assert (pope["accuracy"], pope["precision"], pope["yes_ratio"]) == (0.5, 0.5, 1.0)
    assert pope["categories"]["popular"]["accuracy"] == 0.0
    assert pope["mean"]["accuracy"] == 0.5
    mme = score("mme", ["yes", "no"], [{"answer": "yes", "category": "color", "image_id": 1},
                                       {"answer": "yes", "category": "color", "image_id": 1}])
    assert mme == {"perception": 50.0, "cognition": 0, "subtasks": {
        "color": {"acc": 50.0, "acc_plus": 0.0, "score": 50.0}}}
