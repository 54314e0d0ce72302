"""Benchmark scores as the reference implementations compute them, quirks included, so that our numbers compare with
published ones. Each function names the code it reproduces (repository and file); pure Python, no torch.

Accuracies are fractions in [0, 1] (the references print them as percentages); MME scores are the reference's points
(at most 200 per subtask). `score(task, predictions, references)` dispatches on the task name; `TASKS` lists them.
"""
import re
import string
from collections import defaultdict

# ---------------------------------------------------------------------------------------------------------------
# VQA accuracy. Reference: GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py (Python 3 version,
# commit c4e6a0e4), used for VQAv2; TextVQA is scored by MMF's port of it in haotian-liu/LLaVA
# llava/eval/m4c_evaluator.py (EvalAIAnswerProcessor, TextVQAAccuracyEvaluator).
# ---------------------------------------------------------------------------------------------------------------

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# the marks the reference deletes or turns into spaces; neither the period (handled apart) nor ' or : is one
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# Meant as "a period with no digit on either side", but `(?!<=\d)` is a lookahead, always true in front of a
# period, not the lookbehind `(?<!\d)`: every period not followed by a digit is removed, the one of "3." included.
_LONE_PERIOD = re.compile(r"(?!<=\d)\.(?!\d)")
# the reference calls periodStrip.sub("", text, re.UNICODE): the flag lands in sub's count parameter, so only the
# first re.UNICODE == 32 such periods are removed
_LONE_PERIOD_LIMIT = 32
# Apostrophe-less spellings and what the reference turns them into (its own table, "somebody'd" -> "somebodyd"
# included). It lists six more entries that can never change a word, left out here: "Id've", "I'dve", "Im", "Ive"
# (looked up after lowercasing, so never found) and "let's", "she's" (mapped to themselves).
_CONTRACTIONS = {
    "'ow'sat": "'ow's'at", "'ows'at": "'ow's'at", "aint": "ain't", "arent": "aren't", "cant": "can't",
    "couldn'tve": "couldn't've", "couldnt": "couldn't", "couldnt've": "couldn't've", "couldve": "could've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadn'tve": "hadn't've", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hasnt": "hasn't", "havent": "haven't", "he'dve": "he'd've", "hed": "he'd",
    "hed've": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "isnt": "isn't",
    "it'dve": "it'd've", "itd": "it'd", "itd've": "it'd've", "itll": "it'll", "maam": "ma'am",
    "mightn'tve": "mightn't've", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "shant": "shan't", "she'dve": "she'd've", "shed've": "she'd've",
    "shouldn'tve": "shouldn't've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldve": "should've",
    "somebody'd": "somebodyd", "somebody'dve": "somebody'd've", "somebodyd've": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someone'dve": "someone'd've", "someoned": "someone'd",
    "someoned've": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "something'dve": "something'd've", "somethingd": "something'd", "somethingd've": "something'd've",
    "somethingll": "something'll", "thats": "that's", "there'dve": "there'd've", "thered": "there'd",
    "thered've": "there'd've", "therere": "there're", "theres": "there's", "they'dve": "they'd've",
    "theyd": "they'd", "theyd've": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "we'dve": "we'd've", "wed've": "we'd've", "werent": "weren't",
    "weve": "we've", "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've", "who'dve": "who'd've",
    "whod": "who'd", "whod've": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't", "wouldn'tve": "wouldn't've",
    "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldve": "would've", "y'all'dve": "y'all'd've",
    "y'alld've": "y'all'd've", "y'allll": "y'all'll", "yall": "y'all", "yall'd've": "y'all'd've",
    "yall'll": "y'all'll", "you'dve": "you'd've", "youd": "you'd", "youd've": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}


def _vqa_punctuation(text):
    """vqaEval.processPunctuation. Whether a mark is deleted or becomes a space is decided on the input text: a mark
    that touches a space anywhere ("red, blue") is deleted everywhere; so is every mark of a text holding a
    digit-comma-digit anywhere ("1,000"); otherwise it becomes a space ("red,blue" -> "red blue")."""
    any_number_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        deleted = any_number_comma or mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if deleted else " ")
    return _LONE_PERIOD.sub("", out, count=_LONE_PERIOD_LIMIT)


def _vqa_digits_articles(text):
    """vqaEval.processDigitArticle: lowercase, split on whitespace, number words zero..ten (and "none") to digits,
    articles dropped, contractions restored, joined with single spaces."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def vqa_normalize(text):
    """The official VQA evaluator's normalisation of a predicted answer (vqaEval.py, evaluate): newlines and tabs to
    spaces, strip, punctuation (see _vqa_punctuation; lone periods removed), then lowercase, number words to digits,
    articles dropped and contractions restored. "Two dogs." -> "2 dogs", "1,000" -> "1000", "dont" -> "don't"."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _vqa_digits_articles(_vqa_punctuation(text))


def _leave_one_out_accuracy(answer, gt_answers):
    """For each human answer left out in turn, min(1, matches among the others / 3); the mean of those values, i.e.
    the average over all 9-of-10 subsets. The reference leaves out one answer record at a time (records carry
    distinct ids), so equal answer strings are still left out one by one: leave-one-out goes by position."""
    if not gt_answers:
        raise ValueError("VQA accuracy needs at least one ground-truth answer")
    matches = gt_answers.count(answer)
    # summed in the reference's order, then divided, as the reference does
    return sum(min(1, (matches - (gt == answer)) / 3) for gt in gt_answers) / len(gt_answers)


def vqa_accuracy(prediction, gt_answers):
    """VQAv2 accuracy of one prediction against its human answers (10 in VQAv2), as vqaEval.py's evaluate computes
    it: the prediction goes through vqa_normalize; the answers (normalised by the dataset already) only through the
    punctuation step, and only when they are not all the same; then the 9-of-10 average of min(1, matches / 3).

    lmms-eval's vqav2 task differs slightly: it puts the answers through both steps, always, and its
    digit-comma-digit test (EvalAIAnswerProcessor's) also matches "1,,000"."""
    answers = list(gt_answers)
    if len(set(answers)) > 1:
        answers = [_vqa_punctuation(a) for a in answers]
    return _leave_one_out_accuracy(vqa_normalize(prediction), answers)


def textvqa_normalize(text):
    """EvalAIAnswerProcessor of LLaVA's llava/eval/m4c_evaluator.py: lowercase, delete every "," and "?", split off
    "'s" ("man's" -> "man 's"), strip, then vqa_normalize. (Its own digit-comma-digit regex, written differently
    from vqaEval's, can never match: the commas are gone by then.)"""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return vqa_normalize(text)


def textvqa_accuracy(prediction, gt_answers):
    """TextVQA accuracy as LLaVA's llava/eval/eval_textvqa.py scores it (TextVQAAccuracyEvaluator, also lmms-eval's
    textvqa task): the prediction and every answer through textvqa_normalize, then the 9-of-10 average of
    min(1, matches / 3). The reference asserts 10 answers; any number is accepted here."""
    return _leave_one_out_accuracy(textvqa_normalize(prediction), [textvqa_normalize(a) for a in gt_answers])


# ---------------------------------------------------------------------------------------------------------------
# Exact match: the project's own datasets, and GQA as lmms-eval scores it.
# ---------------------------------------------------------------------------------------------------------------

def exact_match(prediction, answer):
    """1.0 when the two strings are equal after strip() and lower(), else 0.0 (easyvqa, scenes)."""
    return float(prediction.strip().lower() == answer.strip().lower())


_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def gqa_match(prediction, answer):
    """GQA as lmms-eval's gqa task scores it: the prediction is stripped (lmms-eval's ConfigurableTask.
    process_results does that for every generate_until task), then exact_match with ignore_case and
    ignore_punctuation (lmms_eval/api/metrics.py exact_match_hf_evaluate): both strings lowercased, every character
    of string.punctuation deleted, then compared as they are: inner whitespace is not collapsed, the answer not
    stripped. 1.0 or 0.0.

    LLaVA's route (scripts/convert_gqa_for_eval.py, then GQA's own eval.py) compares prediction.rstrip(".").lower()
    with the answer instead, so "left-hand" differs there from "lefthand" but not here."""
    return float(prediction.strip().lower().translate(_NO_PUNCTUATION) == answer.lower().translate(_NO_PUNCTUATION))


# ---------------------------------------------------------------------------------------------------------------
# POPE. Reference: haotian-liu/LLaVA llava/eval/eval_pope.py.
# ---------------------------------------------------------------------------------------------------------------

def pope_parse(answer):
    """"yes" or "no", as LLaVA's eval_pope.py reads a free-form answer: keep the text before the first period, delete
    the commas, split on single spaces; "no" when one of the words is exactly "No", "no" or "not", else "yes". So
    "Not really" and "NO" read as "yes", and so does "There isn't". The answer is stripped first, as LLaVA's
    model_vqa_loader.py strips what it writes."""
    words = answer.strip().partition(".")[0].replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def _yes_no(label):
    label = label.strip().lower()
    if label not in ("yes", "no"):
        raise ValueError(f"a yes/no label must be 'yes' or 'no', got {label!r}")
    return label


def pope_metrics(predictions, labels):
    """POPE metrics of eval_pope.py, with "yes" the positive class: accuracy (TP + TN) / N, precision TP / (TP + FP),
    recall TP / (TP + FN), F1 = 2PR / (P + R), and yes_ratio = the share of predictions read as "yes" (LLaVA's
    convention; lmms-eval's pope task takes the share of "yes" labels instead, and reads predictions by exact
    "yes"/"no" only). Predictions are read by pope_parse; labels must be "yes"/"no" (any case). Where LLaVA would
    divide by zero (no "yes" predicted, say) precision, recall or F1 is 0.0, as in lmms-eval. The counts come along
    as tp, fp, tn, fn."""
    pred_yes = [pope_parse(p) == "yes" for p in predictions]
    label_yes = [_yes_no(label) == "yes" for label in labels]
    if len(pred_yes) != len(label_yes) or not pred_yes:
        raise ValueError(f"POPE needs as many labels as predictions, and at least one; got {len(pred_yes)} "
                         f"predictions and {len(label_yes)} labels")
    pairs = list(zip(pred_yes, label_yes))
    tp, fp = pairs.count((True, True)), pairs.count((True, False))
    tn, fn = pairs.count((False, False)), pairs.count((False, True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / len(pairs), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(pred_yes) / len(pairs), "tp": tp, "fp": fp, "tn": tn, "fn": fn}


POPE_RATES = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def pope_by_category(predictions, labels, categories):
    """pope_metrics of each category (POPE's adversarial / popular / random), each scored on its own as
    eval_pope.py does, and "mean": the unweighted mean of each rate over the categories (the single POPE figure
    papers quote is usually this mean of F1; eval_pope.py only prints the categories)."""
    if not len(predictions) == len(labels) == len(categories) or not predictions:
        raise ValueError("POPE needs one label and one category per prediction, and at least one prediction")
    groups = defaultdict(lambda: ([], []))
    for prediction, label, category in zip(predictions, labels, categories):
        groups[category][0].append(prediction)
        groups[category][1].append(label)
    per_category = {category: pope_metrics(*group) for category, group in groups.items()}
    mean = {rate: sum(m[rate] for m in per_category.values()) / len(per_category) for rate in POPE_RATES}
    return {"categories": per_category, "mean": mean}


# ---------------------------------------------------------------------------------------------------------------
# MME. Reference: MME's eval_tool/calculation.py (BradyFU/Awesome-Multimodal-Large-Language-Models, Evaluation
# branch; run by LLaVA's scripts/v1_5/eval/mme.sh); lmms-eval's mme task follows it.
# ---------------------------------------------------------------------------------------------------------------

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_parse(answer):
    """"yes", "no" or "other", as calculation.py's parse_pred_ans reads a lowercased answer: "yes" when "yes" is
    within its first 4 characters, else "no" when "no" is ("not sure" and "none" read as "no"), else "other" (an
    exact "yes"/"no", which the reference tests first, falls under the same rule). Stripped first, as LLaVA's
    model_vqa_loader.py strips its outputs. lmms-eval's variant also deletes periods and reads a lone "y"/"n"."""
    head = answer.strip().lower()[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def mme_scores(predictions, answers, categories, image_ids):
    """MME scores as calculation.py computes them. Per subtask (category): acc = % of its questions answered right
    ("other" counts wrong), acc_plus = % of its images with both of their two questions right, score = acc +
    acc_plus (at most 200). perception = sum of the scores of the MME_PERCEPTION subtasks (at most 2000), cognition
    = that of the MME_COGNITION ones (at most 800), each over the subtasks present, as lmms-eval sums them
    (calculation.py needs all 14).

    A question's image is image_ids[i] (calculation.py pairs consecutive lines of a subtask's file; lmms-eval groups
    by question_id, the image path); every image must have exactly two questions. Predictions are read by mme_parse,
    answers must be "yes"/"no" (any case). Returns {"perception", "cognition", "subtasks": {name: {"acc",
    "acc_plus", "score"}}}."""
    if not len(predictions) == len(answers) == len(categories) == len(image_ids):
        raise ValueError("MME needs one answer, category and image id per prediction")
    by_image = defaultdict(list)   # (subtask, image) -> [right?, right?]
    for prediction, answer, category, image in zip(predictions, answers, categories, image_ids):
        if category not in MME_PERCEPTION + MME_COGNITION:
            raise ValueError(f"unknown MME subtask {category!r}; MME's are {', '.join(MME_PERCEPTION + MME_COGNITION)}")
        by_image[category, image].append(mme_parse(prediction) == _yes_no(answer))
    subtasks = {}
    for category in dict.fromkeys(category for category, _ in by_image):
        images = [right for (c, _), right in by_image.items() if c == category]
        if any(len(right) != 2 for right in images):
            raise ValueError(f"MME scores two questions per image; subtask {category!r} has an image with "
                             f"another number")
        acc = sum(map(sum, images)) / (2 * len(images))
        acc_plus = sum(map(all, images)) / len(images)
        subtasks[category] = {"acc": acc * 100, "acc_plus": acc_plus * 100, "score": acc * 100 + acc_plus * 100}
    return {"perception": sum(subtasks[c]["score"] for c in MME_PERCEPTION if c in subtasks),
            "cognition": sum(subtasks[c]["score"] for c in MME_COGNITION if c in subtasks),
            "subtasks": subtasks}


# ---------------------------------------------------------------------------------------------------------------
# Multiple choice. ScienceQA reference: haotian-liu/LLaVA llava/eval/eval_science_qa.py. MMBench reference:
# lmms-eval's mmbench_en_dev_static (lmms_eval/tasks/mmbench/mmbench_evals.py, which keeps VLMEvalKit's can_infer,
# and lmms_eval/tasks/_task_utils/mcq_extract.py), at lmms-eval commit 75571cf.
# ---------------------------------------------------------------------------------------------------------------

_SQA_LETTERS = ("A", "B", "C", "D", "E")
# the reference's pattern; its unescaped final "." wants any one character after the letter, so "The answer is B"
# at the very end is not read, while "The answer is Blue" reads as B
_SQA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def scienceqa_option(prediction, num_choices):
    """The option letter a ScienceQA prediction names, or None, as eval_science_qa.py reads it (case-sensitive):
    the prediction exactly a letter ("B"); or a letter, a period and a space opening it ("B. sphere"); or exactly one
    "The answer is X" followed by any character. Only the question's own letters count (A.. for num_choices). So
    "B." alone, "(B)" and "b" are not read. Stripped first, as LLaVA's model_vqa_science.py strips its outputs.
    lmms-eval's scienceqa_img reads differently: the letter in any case, or an uppercase letter and a period
    opening the answer ("B." included), and no "The answer is"."""
    text = prediction.strip()
    if text in _SQA_LETTERS:
        letter = text
    elif len(text) >= 3 and text[0] in _SQA_LETTERS and text[1:3] == ". ":
        letter = text[0]
    else:
        found = _SQA_ANSWER_IS.findall(text)
        letter = found[0] if len(found) == 1 else None
    return letter if letter in _SQA_LETTERS[:num_choices] else None


def scienceqa_accuracy(predictions, answers, num_choices):
    """ScienceQA accuracy of eval_science_qa.py (its IMG-Accuracy when the questions are those with an image, i.e.
    ScienceQA-IMG): the share of predictions whose scienceqa_option is the answer; answers[i] is the index of the
    right choice (the dataset's "answer" field), num_choices[i] the question's number of choices."""
    if not len(predictions) == len(answers) == len(num_choices) or not predictions:
        raise ValueError("ScienceQA needs one answer and one choice count per prediction, and at least one")
    right = [scienceqa_option(p, n) == _SQA_LETTERS[a] for p, a, n in zip(predictions, answers, num_choices)]
    return sum(right) / len(right)


_MMB_LETTERS = "ABCDE"
# (before, after) a letter for it to count as a whole-word option, tried in this order
_MMB_WRAPPED = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."), (":", ""), (":", ","),
                (":", "."), (":", ")"), (":", ")."))


def _mmbench_letter_word(answer):
    """VLMEvalKit's can_infer_option (as kept in lmms-eval): the answer's whitespace-separated words are searched for
    exactly one of the letters A-E (E even on a four-option question) standing alone; or else for exactly one
    written in one of the _MMB_WRAPPED forms ("B.", "(B)", ...), form by form. The lone-letter rule is skipped when
    "A" stands alone among more than 3 words, because it may be the article ("A dog is on the left")."""
    words = answer.split()
    lone = [c for c in _MMB_LETTERS if c in words]
    if len(lone) == 1 and not ("A" in words and len(words) > 3):
        return lone[0]
    for before, after in _MMB_WRAPPED:
        wrapped = [c for c in _MMB_LETTERS if before + c + after in words]
        if len(wrapped) == 1:
            return wrapped[0]
    return None


def _mmbench_letter_by_text(answer, options):
    """VLMEvalKit's can_infer_text: the one option whose text (lowercased) occurs in the lowercased answer."""
    answer = answer.lower()
    found = [letter for letter, text in options.items() if str(text).lower() in answer]
    return found[0] if len(found) == 1 else None


# lmms-eval mcq_extract.py's answer phrases, English, Korean, Chinese and Japanese ones, in its order
_MCQ_PHRASES = ("the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
                "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
                "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select",
                "i pick", "my answer is", "my choice is",
                "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは")
# (priority, before, after): a letter written so, anywhere; a higher priority wins, then the later position
_MCQ_FORMS = ((6, "(", ")"), (5, "", "."), (4, "", ":"), (3, "", ")"), (2, "", " "))
_MCQ_PHRASE, _MCQ_START, _MCQ_END = 7, 10, 9


def _mcq_extract_letter(answer, letters):
    """lmms-eval's extract_mcq_answer (mcq_extract.py), its MMBench static fallback. The answer is stripped of
    whitespace, then of , . ! ? ; : ' " at both ends (one mark after another, in that order), and padded with a
    space each side. Candidates: the last "(X)", "X.", "X:", "X)" and "X " of each letter; after each answer phrase
    ("the answer is", ... case-insensitive), the first occurrence of each letter; a letter opening or ending the
    text not as part of a word. The highest priority wins (opening 10, ending 9, phrase 7, then the forms in
    _MCQ_FORMS order), then the later position; with no candidate, the last occurrence of any letter, anywhere."""
    text = answer.strip()
    for mark in ",.!?;:'\"":
        text = text.strip(mark)
    padded = f" {text} "
    candidates = []   # (priority, position, letter)
    for priority, before, after in _MCQ_FORMS:
        candidates += [(priority, padded.rfind(before + c + after), c) for c in letters if before + c + after in padded]
    lowered = padded.lower()
    for phrase in _MCQ_PHRASES:
        start = lowered.find(phrase)
        if start != -1:
            after_phrase = start + len(phrase)
            candidates += [(_MCQ_PHRASE, padded.find(c, after_phrase), c)
                           for c in letters if c in padded[after_phrase:]]
    core = padded.strip()
    for c in letters:
        if core.startswith(c) and (len(core) == 1 or not core[1].isalpha()):
            candidates.append((_MCQ_START, 0, c))
        if core.endswith(c) and (len(core) == 1 or not core[-2].isalpha()):
            candidates.append((_MCQ_END, len(padded) - 1, c))
    if not candidates:
        candidates = [(0, padded.rfind(c), c) for c in letters if c in padded]
    # no two letters tie on (priority, position), so the letter never decides
    return max(candidates)[2] if candidates else None


def mmbench_option(prediction, options):
    """The option letter an MMBench prediction names, or None, as lmms-eval's mmbench_en_dev_static reads it: the
    stripped prediction by VLMEvalKit's rules (a lone or wrapped letter, else the one option whose text it contains),
    else by lmms-eval's extract_mcq_answer over the question's letters. options maps the question's letters to their
    texts ({"A": "cat", "B": "dog"}). VLMEvalKit itself, without a GPT judge, counts the answers its rules miss as
    wrong instead of trying extract_mcq_answer."""
    text = prediction.strip()
    return (_mmbench_letter_word(text) or _mmbench_letter_by_text(text, options)
            or _mcq_extract_letter(text, sorted(options)))


_MMB_CIRCULAR_STRIDE = 1_000_000


def mmbench_accuracy(predictions, answers, options, indices=None):
    """MMBench accuracy of lmms-eval's mmbench_en_dev_static (MMBench_Evaluator.eval_result): with indices (the
    dataset's "index" column), circular evaluation: the rows whose index i % 1,000,000 is the same are one question
    and its circular shifts, and a question counts right only when mmbench_option gives the answer letter on every
    one of its rows; the accuracy is over the questions whose unshifted row (index < 1,000,000) is present. Without
    indices every row is a question of its own."""
    if not len(predictions) == len(answers) == len(options) or not predictions:
        raise ValueError("MMBench needs one answer and one option dict per prediction, and at least one")
    right = [mmbench_option(p, o) == a for p, a, o in zip(predictions, answers, options)]
    if indices is None:
        return sum(right) / len(right)
    if len(indices) != len(right):
        raise ValueError("MMBench circular evaluation needs one index per prediction")
    question_right = defaultdict(lambda: True)
    for index, row_right in zip(indices, right):
        question_right[index % _MMB_CIRCULAR_STRIDE] &= row_right
    questions = {index for index in indices if index < _MMB_CIRCULAR_STRIDE}
    if not questions:
        raise ValueError("MMBench circular evaluation needs the unshifted rows (index < 1,000,000)")
    return sum(question_right[q] for q in questions) / len(questions)


# ---------------------------------------------------------------------------------------------------------------
# Dispatcher
# ---------------------------------------------------------------------------------------------------------------

def _mean(values):
    return sum(values) / len(values)


def _score_pope(predictions, references):
    labels = [r["answer"] for r in references]
    return {**pope_metrics(predictions, labels),
            **pope_by_category(predictions, labels, [r["category"] for r in references])}


_SCORERS = {
    "easyvqa": lambda preds, refs: {"accuracy": _mean(list(map(exact_match, preds, refs)))},
    "scenes": lambda preds, refs: {"accuracy": _mean(list(map(exact_match, preds, refs)))},
    "vqav2": lambda preds, refs: {"accuracy": _mean(list(map(vqa_accuracy, preds, refs)))},
    "textvqa": lambda preds, refs: {"accuracy": _mean(list(map(textvqa_accuracy, preds, refs)))},
    "gqa": lambda preds, refs: {"accuracy": _mean(list(map(gqa_match, preds, refs)))},
    "pope": _score_pope,
    "mme": lambda preds, refs: mme_scores(preds, [r["answer"] for r in refs], [r["category"] for r in refs],
                                          [r["image_id"] for r in refs]),
    "scienceqa_img": lambda preds, refs: {"accuracy": scienceqa_accuracy(
        preds, [r["answer"] for r in refs], [len(r["choices"]) for r in refs])},
    "mmbench": lambda preds, refs: {"accuracy": mmbench_accuracy(
        preds, [r["answer"] for r in refs], [r["options"] for r in refs], [r["index"] for r in refs])},
}
TASKS = tuple(_SCORERS)


def score(task, predictions, references):
    """Score a task's predictions (strings, one per question) against its references, the way its reference
    implementation does (see the functions above). What one reference is, per task:

    - easyvqa, scenes: the answer string (exact_match); gqa: the answer string (gqa_match);
    - vqav2, textvqa: the list of human answers (vqa_accuracy, textvqa_accuracy);
    - pope: {"answer": "yes"/"no", "category": "adversarial"/"popular"/"random"} (pope_metrics over all questions,
      plus pope_by_category's "categories" and "mean");
    - mme: {"answer": "yes"/"no", "category": subtask name, "image_id": ...} (mme_scores);
    - scienceqa_img: {"answer": index of the right choice, "choices": [choice texts]} (scienceqa_accuracy);
    - mmbench: {"answer": letter, "options": {letter: text}, "index": the dataset's index} (mmbench_accuracy,
      circular).

    Returns a dict: {"accuracy": fraction} for the accuracy tasks, POPE's rates and counts, MME's points.
    """
    if task not in _SCORERS:
        raise ValueError(f"unknown task {task!r}; the tasks are {', '.join(TASKS)}")
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"{task}: need one reference per prediction, and at least one prediction; got "
                         f"{len(predictions)} predictions and {len(references)} references")
    return _SCORERS[task](predictions, references)
