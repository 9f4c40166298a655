from muco.inputs import templates as T

SYS = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def test_base_template_exact():
    assert T.base_template("hi\n") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi\n<|im_end|>\n<|im_start|>assistant\n<|emb|><|im_end|>"
    )


def test_pretrain_template_exact():
    turns = T.pretrain_query_turns(["a?", "b?"], has_image=True)
    assert T.pretrain_template(turns) == (
        SYS
        + "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>\na?<|im_end|>\n<|im_start|>assistant\n"
        "<|emb|><|im_end|>\n"
        "<|im_start|>user\nb?<|im_end|>\n<|im_start|>assistant\n<|emb|><|im_end|>"
    )


def test_finetune_template_exact():
    s = T.finetune_template("u\n", "m <|mask|>")
    assert s == (
        SYS
        + "<|im_start|>user\nu\n<|im_end|>\n<|im_start|>assistant\n<|emb|><|im_end|>"
        "\n<|im_start|>user\nPlease rewrite your last response in human-readable language."
        "\n<|im_start|>assistant\nm <|mask|><|im_end|>\n<|im_start|>user\n"
        "Generate a response that first reconstructs your very last response by inferring any masked "
        "information, then acknowledges or rephrases the complete what I asked you, and finally integrates "
        "the Answer information seamlessly.<|im_end|>\n<|im_start|>assistant\n<|emb|><|im_end|>"
    )
    # the released quirk: no <|im_end|> after PI1
    assert T.PI1 + "\n<|im_start|>assistant\n" in s


def test_finetune_prefix_equals_base_up_to_first_emb():
    u = T.single_turn_user_text("what is this", has_image=True)
    ft, base = T.finetune_template(u, "<|mask|>"), T.base_template(u)
    cut = base.index(T.EMB_TOKEN) + len(T.EMB_TOKEN)
    assert ft[:cut] == base[:cut]


def test_single_turn_user_text():
    assert T.single_turn_user_text("x", has_image=True) == T.IMG + "\nx\n"
    assert T.single_turn_user_text("x\n", has_image=False) == "x\n"


def test_emb_count_per_template():
    assert T.base_template("a").count(T.EMB_TOKEN) == 1
    assert T.pretrain_template(["a"] * 5).count(T.EMB_TOKEN) == 5
    assert T.finetune_template("a", "b").count(T.EMB_TOKEN) == 2


def test_find_reserved():
    assert T.find_reserved("plain text") is None
    assert T.find_reserved("oops <|emb|>") == "<|emb|>"
