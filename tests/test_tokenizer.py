from transformers import CLIPTokenizer

from workbench.shapes.bench_prompts import vocabulary
from workbench.tokenizer import build_word_tokenizer


def test_every_world_word_is_one_token_and_other_text_still_tokenizes(tmp_path):
    words = vocabulary()
    tokenizer = build_word_tokenizer(words, model_max_length=32)
    split = [word for word in words if len(tokenizer.tokenize(word)) != 1]
    assert split == []
    assert len(tokenizer.tokenize("xyzzy")) > 1 and tokenizer.unk_token_id not in tokenizer("xyzzy").input_ids[1:-1]
    tokenizer.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    text = "Three orange triangles above a purple square"
    assert reloaded(text).input_ids == tokenizer(text).input_ids
    assert len(reloaded.tokenize(text)) == 7
