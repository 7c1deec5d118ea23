"""Loaders and request definitions (no model)."""

import bz2
import json

import pytest

from jaxlin.data.paths import MissingDataError
from jaxlin.data.tokenizer import EOT_TOKEN, get_tokenizer
from jaxlin.eval import tasks
from jaxlin.eval.tasks import DataFormatError
from tests.eval.eval_helpers import harness_rolling_windows


def test_real_files_parse_with_the_expected_counts(data_dir):
    wiki = tasks.load_wikitext(data_dir / "wikitext-2-raw/wiki.test.raw")
    assert wiki.text.count("\n") == 4358
    assert len(wiki.pages) == 62  # the harness's wikitext-2-raw-v1 test documents
    assert wiki.pages[0].lstrip().startswith("= Robert Boulter =")
    assert len(tasks.load_lambada(data_dir / "lambada/lambada_test.jsonl")) == 5153
    assert len(tasks.load_arc(data_dir / "arc_easy/ARC-Easy-Test.jsonl")) == 2376
    assert len(tasks.load_hellaswag(data_dir / "hellaswag/hellaswag_val_full.txt.bz2")) == 10042
    assert len(tasks.load_piqa(data_dir / "piqa/valid.jsonl", data_dir / "piqa/valid-labels.lst")) == 1838
    winogrande = tasks.load_winogrande(data_dir / "winogrande/winogrande_dev_llmfoundry.jsonl")
    assert len(winogrande) == 1267
    labels = (data_dir / "winogrande/dev-labels.lst").read_text().split()
    assert [q.gold + 1 for q in winogrande] == [int(x) for x in labels]
    arc_challenge = tasks.load_arc(data_dir / "arc_challenge/ARC-Challenge-Test.jsonl")
    assert len(arc_challenge) == 1172 and {len(q.choices) for q in arc_challenge} == {3, 4, 5}
    boolq = tasks.load_boolq(data_dir / "boolq/val.jsonl")
    assert len(boolq) == 3270 and sum(q.gold for q in boolq) == 2033  # 62.2 % "yes", BoolQ's majority class
    assert len(tasks.load_copa(data_dir / "copa/val.jsonl")) == 100
    assert len(tasks.load_openbookqa(data_dir / "openbookqa/test.tsv")) == 500


def test_prompts_follow_the_harness(data_dir):
    arc_row = json.loads((data_dir / "arc_easy/ARC-Easy-Test.jsonl").open().readline())
    arc = tasks.load_arc(data_dir / "arc_easy/ARC-Easy-Test.jsonl")[0]
    assert arc.pairs[0] == (f"Question: {arc_row['question']['stem']}\nAnswer:",
                            " " + arc_row["question"]["choices"][0]["text"])
    assert arc.gold == "ABCD".index(arc_row["answerKey"])

    piqa = tasks.load_piqa(data_dir / "piqa/valid.jsonl", data_dir / "piqa/valid-labels.lst")[0]
    assert piqa.pairs[1] == ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
                             " Provide the guinea pig with a cage full of a few inches of bedding made of ripped "
                             "jeans material, you will also need to supply it with a water bottle and a food dish.")
    assert piqa.gold == 0

    wino = tasks.load_winogrande(data_dir / "winogrande/winogrande_dev_llmfoundry.jsonl")[0]
    assert wino.pairs == (("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                          ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."))

    context, target = tasks.load_lambada(data_dir / "lambada/lambada_test.jsonl")[0]
    assert context.endswith("I don't care about") and target == " signs"


def test_new_prompts_follow_the_harness(data_dir):
    """lm-eval's arc_challenge, boolq, copa and openbookqa requests for rows of the official files,
    written out by hand: (context, target delimiter " " + choice) per choice, and the gold index."""
    arc = tasks.load_arc(data_dir / "arc_challenge/ARC-Challenge-Test.jsonl")
    stem = ("Question: The end result in the process of photosynthesis is the production of sugar and oxygen. "
            "Which step signals the beginning of photosynthesis?\nAnswer:")
    assert arc[2].pairs == ((stem, " Chemical energy is absorbed through the roots."),
                            (stem, " Light energy is converted to chemical energy."),
                            (stem, " Chlorophyll in the leaf captures light energy."),
                            (stem, " Sunlight is converted into chlorophyll."))
    assert arc[2].gold == 2 and arc[2].choices[0] == "Chemical energy is absorbed through the roots."
    sled = arc[44]  # numeric labels 1-4, answerKey "2"
    assert sled.pairs[1][1] == " Kinetic energy increases and potential energy decreases." and sled.gold == 1

    boolq = tasks.load_boolq(data_dir / "boolq/val.jsonl")
    context = ("The Punisher (season 2) -- The season is set for release in 2019.\n"
               "Question: are they going to make a punisher season 2?\nAnswer:")
    assert boolq[2644].pairs == ((context, " no"), (context, " yes")) and boolq[2644].gold == 1
    assert boolq[1].pairs[0][0].endswith("\nQuestion: is house tax and property tax are same?\nAnswer:")
    assert boolq[1].pairs[0][0].startswith("Property tax -- Property tax or 'house tax' is a local tax")

    copa = tasks.load_copa(data_dir / "copa/val.jsonl")
    assert copa[0].pairs == (("The man turned on the faucet therefore", "  the toilet filled with water."),
                             ("The man turned on the faucet therefore", "  water flowed from the spout."))
    assert copa[0].gold == 1
    assert copa[4].pairs == (("The hamburger meat browned because", "  the cook froze it."),
                             ("The hamburger meat browned because", "  the cook grilled it."))
    assert copa[4].gold == 1

    obqa = tasks.load_openbookqa(data_dir / "openbookqa/test.tsv")
    assert obqa[1].pairs == (("There is most likely going to be fog around:", " a marsh"),
                             ("There is most likely going to be fog around:", " a tundra"),
                             ("There is most likely going to be fog around:", " the plains"),
                             ("There is most likely going to be fog around:", " a desert"))
    assert obqa[1].gold == 0
    assert obqa[2].pairs[2] == ("Predators eat", " bunnies") and obqa[2].gold == 2
    assert obqa[2].choices == ("lions", "humans", "bunnies", "grass")  # acc_norm's lengths: no delimiter


def test_copa_tokens_start_with_two_spaces(data_dir):
    tok = get_tokenizer(data_dir)
    context, continuation = tasks.encode_pair(tok, "The man turned on the faucet therefore", "  water flowed.")
    assert tok.decode(continuation) == "  water flowed." and tok.decode(context).endswith("therefore")


def test_openbookqa_jsonl_and_boolq_labels(tmp_path):
    row = {"id": "7-980", "question": {"stem": "The sun is responsible for",
                                       "choices": [{"text": "puppies learning new tricks", "label": "A"},
                                                   {"text": "plants sprouting, blooming and wilting", "label": "B"}]},
           "answerKey": "B"}
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (question,) = tasks.load_openbookqa(path)
    assert question.pairs[1] == ("The sun is responsible for", " plants sprouting, blooming and wilting")
    assert question.gold == 1
    boolq = tmp_path / "val.jsonl"
    boolq.write_text("".join(json.dumps({"question": "q", "passage": "p", "label": label}) + "\n"
                             for label in ("false", True, 0)))
    assert [q.gold for q in tasks.load_boolq(boolq)] == [0, 1, 0]


def test_hellaswag_text_format_matches_the_original_jsonl(data_dir, tmp_path):
    # The first validation rows as the original jsonl has them: ActivityNet with a lower-case ctx_b
    # the harness capitalises, and WikiHow with [tags] and an empty ctx_b.
    rows = [
        {"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
         "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                     "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "label": 3},
        {"activity_label": "Health", "ctx_b": "", "label": "1",
         "ctx_a": "[header] How to use aromatherapy for depression [title] Know what oils help. [step] Basil works.",
         "endings": ["[substeps] Try it.", "Use [title] it", "a", "b"]},
    ]
    jsonl = tmp_path / "hellaswag_val.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first, wikihow = tasks.load_hellaswag(jsonl)
    assert first == tasks.load_hellaswag(data_dir / "hellaswag/hellaswag_val_full.txt.bz2")[0]
    assert first.pairs[0][0] == "Roof shingle removal: A man is sitting on a roof. He"
    assert wikihow.pairs[0] == ("Health: How to use aromatherapy for depression. Know what oils help. Basil works.",
                                "  Try it.")  # the harness strips before it drops tags
    assert wikihow.choices[1] == "Use. it" and wikihow.gold == 1


def test_winogrande_original_format(tmp_path):
    path = tmp_path / "dev.jsonl"
    path.write_text(json.dumps({"qID": "x", "sentence": "The cup fell off the table because _ was slippery.",
                                "option1": "the cup", "option2": "the table", "answer": "2"}) + "\n")
    (question,) = tasks.load_winogrande(path)
    assert question.pairs == (("The cup fell off the table because the cup", " was slippery."),
                              ("The cup fell off the table because the table", " was slippery."))
    assert question.gold == 1


@pytest.mark.parametrize("loader, name, lines, message", [
    (tasks.load_lambada, "l.jsonl", ['{"text": "a b"}', "{not json"], ":2: invalid JSON"),
    (tasks.load_lambada, "l.jsonl", ['{"text": "a b"}', '{"txt": "a b"}'], ":2: missing field 'text'"),
    (tasks.load_lambada, "l.jsonl", ['{"text": "oneword"}'], ":1: field 'text' has no space"),
    (tasks.load_arc, "a.jsonl", ['{"question": {"stem": "q", "choices": [{"text": "x", "label": "A"}]}, '
                                 '"answerKey": "B"}'], ":1: answerKey 'B' is not one of"),
    (tasks.load_hellaswag, "h.jsonl", ['{"activity_label": "a", "ctx_a": "b", "ctx_b": "", '
                                       '"endings": ["1", "2", "3"], "label": 0}'], ":1: field 'endings' must be"),
    (tasks.load_hellaswag, "h.txt", ["q", "0", "a", "b", "c", "d", "q", "7", "a", "b", "c", "d"],
     ":8: label must be an integer in [0, 3]"),
    (tasks.load_hellaswag, "h.txt.bz2", ["q", "0", "a", "b", "c", "d", "q", "1"], ":7: incomplete item"),
    (tasks.load_winogrande, "w.jsonl", ['{"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}'],
     ":1: 'sentence' must contain exactly one '_'"),
    (tasks.load_winogrande, "w.jsonl", ['{"context_options": ["a", "b"], "continuation": "c", "gold": 2}'],
     ":1: label must be an integer in [0, 1]"),
    (tasks.load_winogrande, "w.jsonl", ['[1, 2]'], ":1: expected a JSON object"),
    (tasks.load_boolq, "b.jsonl", ['{"question": "q", "passage": "p", "label": "maybe"}'],
     ":1: label must be true or false"),
    (tasks.load_copa, "c.jsonl", ['{"premise": "p.", "choice1": "a", "choice2": "b", "question": "why", "label": 0}'],
     ":1: field 'question' must be 'cause' or 'effect'"),
    (tasks.load_openbookqa, "o.tsv", ["ID\tQuestion Stem\tChoices\tComplete Question\tAnswer Key",
                                      "1\tq\t(A) a (B) b\tq (A) a (B) b\tC"], ":2: expected choices as"),
    (tasks.load_openbookqa, "o.tsv", ["ID\tQuestion\tChoices"], ":1: missing column"),
])
def test_malformed_rows_name_file_and_line(tmp_path, loader, name, lines, message):
    path = tmp_path / name
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(bz2.compress(data) if name.endswith(".bz2") else data)
    with pytest.raises(DataFormatError, match=str(path).replace(".", r"\.") + message.replace("[", r"\[")):
        loader(path)


def test_piqa_label_errors_name_the_labels_file(tmp_path):
    rows = tmp_path / "valid.jsonl"
    rows.write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n' * 2)
    labels = tmp_path / "labels.lst"
    labels.write_text("0\n")
    with pytest.raises(DataFormatError, match="labels.lst: 1 labels for 2 rows"):
        tasks.load_piqa(rows, labels)
    labels.write_text("0\n2\n")
    with pytest.raises(DataFormatError, match=r"labels.lst:2: label must be an integer in \[0, 1\]"):
        tasks.load_piqa(rows, labels)


def test_missing_data_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(MissingDataError, match="hellaswag/hellaswag_val_full.txt.bz2.*jaxlin.data.download"):
        tasks.task_files("hellaswag", tmp_path)
    (tmp_path / "hellaswag").mkdir()
    (tmp_path / "hellaswag" / "hellaswag_val.jsonl").write_text("")
    assert tasks.task_files("hellaswag", tmp_path) == [tmp_path / "hellaswag" / "hellaswag_val.jsonl"]


def test_wikitext_pages_and_detokenizer(tmp_path):
    path = tmp_path / "wiki.test.raw"
    path.write_text(" \n = A = \n \n x @-@ y , z ( 1 ) \" q \" \n = = Sub = = \n t \n = B = \n w 's \n")
    pages = tasks.load_wikitext(path).pages  # the blank lead-in is dropped; "= = Sub = =" is no title
    assert pages == (" = A = \n \n x @-@ y , z ( 1 ) \" q \" \n = = Sub = = \n t ", " = B = \n w 's \n")
    assert tasks.detokenize_wikitext(pages[0]) == ' = A =\n\nx-y, z (1) "q"\n== Sub ==\nt '
    assert tasks.detokenize_wikitext(pages[1]) == " = B =\nw's\n"


@pytest.mark.parametrize("n", [0, 1, 5, 8, 9, 16, 17, 23])
def test_rolling_windows_are_the_harness_windows(n):
    tokens = list(range(100, 100 + n))
    assert tasks.rolling_windows(tokens, 8) == harness_rolling_windows(tokens, 8)
    predicted = [t for _, cont in tasks.rolling_windows(tokens, 8) for t in cont]
    assert predicted == tokens


def test_contiguous_windows_predict_every_token_but_the_first_once():
    tokens = list(range(20))
    windows = tasks.contiguous_windows(tokens, 8)
    assert windows[0] == ([0], list(range(1, 9)))
    assert [t for _, cont in windows for t in cont] == tokens[1:]
    assert all(len(ctx) + len(cont) <= 9 for ctx, cont in windows)


def test_encode_pair_moves_the_context_trailing_space(data_dir):
    tok = get_tokenizer(data_dir)
    context, continuation = tasks.encode_pair(tok, "Answer: ", "yes")
    assert context == tok.encode_ordinary("Answer:") and continuation == tok.encode_ordinary(" yes")
    assert tasks.encode_pair(tok, "", "hi") == ([EOT_TOKEN], tok.encode_ordinary("hi"))
